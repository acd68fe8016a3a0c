"""The registry of distillation heads and the function that builds the enabled ones."""
from typing import Dict, Optional

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

Every head node also gets ``TEACHER``: the teacher the head reads, a name of
``cfg.DISTILL.TEACHERS`` ("" for ``DISTILL.TEACHER``, as for a head without a node); the head is
then built with that teacher's shapes, and its context is that teacher's.

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
    """Add every registered head's config node to ``cfg`` (``cfg.DISTILL`` must exist), each with
    a ``TEACHER`` key (the teacher the head reads, see the registry's docstring)."""
    for _, cls in DISTILL_HEAD_REGISTRY:
        cls.add_config(cfg)
        node = cfg.DISTILL.get(head_name(cls).upper())
        if node is not None and "TEACHER" not in node:
            # A name of DISTILL.TEACHERS: the teacher this head reads ("": DISTILL.TEACHER).
            node.TEACHER = ""


def head_teacher(cfg, name: str) -> str:
    """The teacher head ``name`` reads: its node's ``TEACHER``, or the default teacher's name."""
    from ..config import DEFAULT_TEACHER

    node = cfg.DISTILL.get(name.upper())
    value = node.get("TEACHER", "") if node is not None else ""
    return value if value and value.upper() != DEFAULT_TEACHER else DEFAULT_TEACHER


def build_distill_heads(
    cfg, student_shapes: Dict[int, ShapeSpec], teacher_shapes: Dict[int, ShapeSpec],
    teachers_shapes: Optional[Dict[str, Dict[int, ShapeSpec]]] = None,
) -> nn.ModuleDict:
    """Build every head named in ``cfg.DISTILL.HEADS``, keyed by its config name.

    ``teachers_shapes`` (teacher name -> its shapes), when given, gives each head the shapes of
    the teacher it reads (:func:`head_teacher`); a head naming a teacher not in it is an error
    naming both. Without it every head gets ``teacher_shapes``."""
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
        shapes = teacher_shapes
        if teachers_shapes is not None:
            teacher = head_teacher(cfg, key)
            if teacher not in teachers_shapes:
                from ..config import TeacherConfigError

                raise TeacherConfigError(unknown_teacher_message(key, teacher, teachers_shapes))
            shapes = teachers_shapes[teacher]
        heads[key] = known[key](cfg, student_shapes, shapes)
    return heads


def unknown_teacher_message(head: str, teacher: str, known) -> str:
    from ..config import DEFAULT_TEACHER

    names = [f"'' or {DEFAULT_TEACHER} (DISTILL.TEACHER)"] + [
        f"{n} (DISTILL.TEACHERS.{n})" for n in known if n != DEFAULT_TEACHER]
    return (f"distillation head '{head}' reads the teacher '{teacher}' (DISTILL.{head.upper()}.TEACHER), "
            f"which this config does not define; known teachers: {', '.join(names)}. Add "
            f"DISTILL.TEACHERS.{teacher} (CONFIG_FILE, WEIGHTS, ...) or name a known one")
