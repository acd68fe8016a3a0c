"""The registry of distillation heads and the function that builds the enabled ones."""
from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

DISTILL_HEAD_REGISTRY = Registry("DISTILL_HEAD")
DISTILL_HEAD_REGISTRY.__doc__ = """
Registry for distillation heads: modules that turn one training step's
:class:`d2kd.modeling.context.DistillContext` into distillation losses.

A registered head is built as ``head = Head(cfg, student_shapes, teacher_shapes)`` where the
shapes are ``dict[int stride, ShapeSpec]`` of the two models' FPN outputs, and is called as
``losses = head(ctx)``, returning ``dict[str, Tensor]`` of scalar losses named
``loss_distill_<head>[_<part>]``, already multiplied by their configured weights. Its class
attribute ``requires`` names the context fields it reads beyond features ("roi" for R-CNN RoI
outputs of both models, "anchors" for dense per-anchor outputs of both models); a head whose
needs the model pair cannot meet is rejected when the model is built.

Enable heads with ``cfg.DISTILL.HEADS = ["fitnet", "kd", ...]`` (the lower-case registry name is
the class name without "Head", e.g. ``FitNetHead`` is "fitnet").
"""

# Registry names are class names; configs use the short lower-case name.
_SHORT_NAMES: Dict[str, str] = {}


def register_head(short_name: str):
    """Class decorator: register in DISTILL_HEAD_REGISTRY under ``short_name`` for configs."""

    def deco(cls):
        DISTILL_HEAD_REGISTRY.register(cls)
        _SHORT_NAMES[short_name] = cls.__name__
        cls.name = short_name
        return cls

    return deco


def available_heads():
    return sorted(_SHORT_NAMES)


def build_distill_heads(
    cfg, student_shapes: Dict[int, ShapeSpec], teacher_shapes: Dict[int, ShapeSpec]
) -> nn.ModuleDict:
    """Build every head named in ``cfg.DISTILL.HEADS``, keyed by its short name."""
    heads = nn.ModuleDict()
    for name in cfg.DISTILL.HEADS:
        key = name.lower()
        if key not in _SHORT_NAMES:
            raise KeyError(
                f"DISTILL.HEADS names '{name}', which is not a registered distillation head; "
                f"available: {', '.join(available_heads())}"
            )
        if key in heads:
            raise ValueError(f"DISTILL.HEADS names '{name}' twice")
        heads[key] = DISTILL_HEAD_REGISTRY.get(_SHORT_NAMES[key])(cfg, student_shapes, teacher_shapes)
    return heads
