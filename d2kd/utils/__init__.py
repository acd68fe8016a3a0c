"""Small utilities, the lowest floor (they import nothing above them): atomic writes, the CPU
thread policy, inference cost, logging, pictures."""
