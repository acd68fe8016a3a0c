"""Built-in datasets; importing this package registers ``d2kd_shapes_{train,val}``."""
from .shapes import ensure_shapes_generated, generate_shapes_split, register_shapes_datasets

register_shapes_datasets()

__all__ = ["ensure_shapes_generated", "generate_shapes_split", "register_shapes_datasets"]
