"""What every distillation head shares: its name, what it reads, the loss-weight schedule."""
from typing import Dict, FrozenSet, List

from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from fvcore.common.param_scheduler import LinearParamScheduler
from torch import nn

from ..structures import DistillContext, select_strides
from ..value_checks import check_distill_values
from .registry import head_name


class DistillHead(nn.Module):
    """Base class of the modules in ``DISTILL_HEAD_REGISTRY`` (see its docstring).

    Subclasses implement ``forward(ctx) -> dict[str, Tensor]`` and set ``requires`` (the
    context keys they read; both models' features by default). A head with settings owns its
    config node ``cfg.DISTILL.<NAME>`` (e.g. ``cfg.DISTILL.FITNET``): it overrides
    :meth:`add_config`, which ``d2kd.add_distill_config`` calls for every registered head. A
    node with ``DECAY`` True follows ``DISTILL.SCHEDULE.LINEAR_DECAY``.
    """

    requires: FrozenSet[str] = frozenset({"student.features", "teacher.features"})
    # Said after the build-time error when the pair cannot supply a requirement: the head's own
    # way out (e.g. GK: turn off the term that needs it), if it has one.
    requirement_hint: str = ""

    @classmethod
    def add_config(cls, cfg) -> None:
        """Add this head's node ``cfg.DISTILL.<NAME>`` with its keys and defaults (a head with no
        settings adds nothing)."""

    def __init__(self, cfg, student_shapes: Dict[int, ShapeSpec], teacher_shapes: Dict[int, ShapeSpec]):
        super().__init__()
        self.name = head_name(type(self))
        self.node = cfg.DISTILL.get(self.name.upper())
        if self.node is None and _owns_config(type(self)):
            raise KeyError(
                f"distillation head '{self.name}' has settings, but this config has no DISTILL."
                f"{self.name.upper()}: it was made before the head's module "
                f"({type(self).__module__}) was imported. Import that module first, then build "
                "the config with d2kd.add_distill_config (or d2kd.config.load_config)"
            )
        # weights, temperatures, periods, counts: one place, one message (d2kd/value_checks.py)
        check_distill_values(cfg, [f"DISTILL.{self.name.upper()}"])
        # The reference GK config decays terms linearly to 0 over training; opt-in per head.
        decay = self.node is not None and bool(self.node.get("DECAY", False))
        self._decay = decay and bool(cfg.DISTILL.SCHEDULE.LINEAR_DECAY)
        self._decay_schedule = LinearParamScheduler(1.0, 0.0)

    def decay_factor(self, ctx: DistillContext) -> float:
        """1 - iter/max_iter when this head decays, else 1."""
        if not self._decay:
            return 1.0
        return self._decay_schedule(min(ctx.iteration / max(ctx.max_iter, 1), 1.0))

    def loss_key(self, part: str = "") -> str:
        return f"loss_distill_{self.name}" + (f"_{part}" if part else "")

    @staticmethod
    def student_kind(cfg) -> str:
        """The student's detector kind name ("two_stage" or "dense"), read off the class that
        ``MODEL.META_ARCHITECTURE`` registers (a Distill meta-architecture declares it)."""
        cls = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        kind = getattr(cls, "kind", None)
        if kind is None:
            raise ValueError(
                f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} is not a distillation "
                "meta-architecture (DistillRCNN, DistillRetinaNet, ...); heads need one"
            )
        return kind.name

    @staticmethod
    def choice(value: str, allowed, key: str) -> str:
        """``value`` if it is one of ``allowed``, else an error naming the config ``key``."""
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}; got '{value}'")
        return value

    @staticmethod
    def select_strides(requested, student_shapes, teacher_shapes, key: str) -> List[int]:
        """See :func:`d2kd.structures.select_strides`."""
        return select_strides(requested, student_shapes, teacher_shapes, key)


def _owns_config(cls) -> bool:
    """Whether ``cls`` (or a head it derives from) overrides :meth:`DistillHead.add_config`."""
    return cls.add_config.__func__ is not DistillHead.add_config.__func__
