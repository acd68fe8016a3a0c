"""Leaf module: the per-step distillation context and the stride helpers every layer uses.

Imports flow one way: ``structures <- prototypes <- heads <- modeling <- engine``.
"""
from .context import (
    REQUIREMENTS,
    STUDENT,
    TEACHER,
    AnchorMatches,
    DenseOutputs,
    DistillContext,
    HeadTower,
    RPNOutputs,
    SampledRoIs,
    StepOutputs,
    requirement_capability,
)
from .strides import assign_box_levels, by_stride, select_strides, shapes_by_stride

__all__ = [
    "REQUIREMENTS", "STUDENT", "TEACHER", "AnchorMatches", "DenseOutputs", "DistillContext",
    "HeadTower", "RPNOutputs", "SampledRoIs", "StepOutputs", "requirement_capability", "assign_box_levels",
    "by_stride", "select_strides", "shapes_by_stride",
]
