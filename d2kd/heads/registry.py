"""The registry of distillation heads and the function that builds the enabled ones."""
from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

DISTILL_HEAD_REGISTRY = Registry("DISTILL_HEAD")
DISTILL_HEAD_REGISTRY.__doc__ = """
Registry for distillation heads: modules that turn one training step's
:class:`d2kd.structures.DistillContext` into distillation losses.

A registered head is built as ``head = Head(cfg, student_shapes, teacher_shapes)`` where the
shapes are ``dict[int stride, ShapeSpec]`` of the two models' FPN outputs, and is called as
``losses = head(ctx)``, returning ``dict[str, Tensor]`` of scalar losses named
``loss_distill_<name>[_<part>]``, already multiplied by their configured weights.

Its ``requires`` (a class or instance attribute) lists the context keys it reads (see
``d2kd.structures.REQUIREMENTS``); a head whose needs the model pair cannot meet, or that
names an unknown key, is rejected when the model is built.

A head's config node is its own: the classmethod ``add_config(cfg)`` adds
``cfg.DISTILL.<NAME>`` with its keys and defaults, and ``d2kd.add_distill_config`` calls it for
every registered head, so a head defined outside d2kd brings its keys with it.

Register with ``@DISTILL_HEAD_REGISTRY.register()``. Configs enable heads by name in
``cfg.DISTILL.HEADS``: the class attribute ``name`` if the class sets one, else the class name
without a trailing "Head", lower-cased (``FitNetHead`` -> "fitnet").
"""


def head_name(cls) -> str:
    """The name configs use for a head class."""
    explicit = cls.__dict__.get("name")
    if explicit:
        return explicit
    base = cls.__name__
    return (base[: -len("Head")] if base.endswith("Head") and base != "Head" else base).lower()


def available_heads() -> Dict[str, type]:
    """Config name -> head class, for every registered head."""
    return {head_name(cls): cls for _, cls in DISTILL_HEAD_REGISTRY}


def add_head_configs(cfg) -> None:
    """Add every registered head's config node to ``cfg`` (``cfg.DISTILL`` must exist)."""
    for _, cls in DISTILL_HEAD_REGISTRY:
        cls.add_config(cfg)


def build_distill_heads(
    cfg, student_shapes: Dict[int, ShapeSpec], teacher_shapes: Dict[int, ShapeSpec]
) -> nn.ModuleDict:
    """Build every head named in ``cfg.DISTILL.HEADS``, keyed by its config name."""
    heads = nn.ModuleDict()
    known = available_heads()
    for name in cfg.DISTILL.HEADS:
        key = name.lower()
        if key not in known:
            raise KeyError(
                f"DISTILL.HEADS names '{name}', which is not a registered distillation head; "
                f"available: {', '.join(sorted(known))}"
            )
        if key in heads:
            raise ValueError(f"DISTILL.HEADS names '{name}' twice")
        heads[key] = known[key](cfg, student_shapes, teacher_shapes)
    return heads
