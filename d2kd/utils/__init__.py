"""Small utilities: atomic writes, resumable train-and-evaluate stages, pictures."""
