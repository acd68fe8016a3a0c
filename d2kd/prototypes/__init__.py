"""GK's prototype generation module (PGM): instance features, prototype selection, the bank."""
from .bank import PrototypeBank
from .instance_features import instance_features
from .selection import select_prototypes

__all__ = ["PrototypeBank", "select_prototypes", "instance_features"]
