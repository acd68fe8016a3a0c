"""Distillation heads, one method per file; importing this package registers them all."""
from .registry import DISTILL_HEAD_REGISTRY, available_heads, build_distill_heads, head_name
from .base import DistillHead
from . import defeat, fgfi, fitnet, gk, kd, pkd, rkd  # noqa: F401  (registration)
from . import ld, pfi, rank_mimic  # noqa: F401  (registration: one-stage methods)
from . import bckd, crosskd  # noqa: F401  (registration: the newest dense methods)
from . import cwd, fbkd, fgd, mgd  # noqa: F401  (registration: other toolboxes' feature methods)

__all__ = ["DISTILL_HEAD_REGISTRY", "DistillHead", "available_heads", "build_distill_heads", "head_name"]
