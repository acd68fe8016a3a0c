"""GK's prototype generation module (PGM): instance features and prototype selection."""
from .instance_features import assign_box_strides, instance_features
from .selection import select_prototypes

__all__ = ["select_prototypes", "instance_features", "assign_box_strides"]
