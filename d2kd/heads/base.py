"""What every distillation head shares: stride selection and the loss-weight schedule."""
from typing import TYPE_CHECKING, Dict, List

from detectron2.layers import ShapeSpec
from fvcore.common.param_scheduler import LinearParamScheduler
from torch import nn

if TYPE_CHECKING:  # the modeling package imports the heads; avoid the cycle at run time
    from ..modeling.context import DistillContext


class DistillHead(nn.Module):
    """Base class of the modules in ``DISTILL_HEAD_REGISTRY`` (see its docstring).

    Subclasses set ``requires`` (context fields beyond features: "roi", "anchors") and
    ``needs_prototypes`` (True when they read the prototype bank), and implement
    ``forward(ctx) -> dict[str, Tensor]``.
    """

    name = "base"
    requires = frozenset()
    needs_prototypes = False

    def __init__(self, cfg, node):
        super().__init__()
        # The reference GK config decays terms linearly to 0 over training; opt-in per head.
        self._decay = bool(node.DECAY) and bool(cfg.DISTILL.SCHEDULE.LINEAR_DECAY)
        self._decay_schedule = LinearParamScheduler(1.0, 0.0)

    def decay_factor(self, ctx: "DistillContext") -> float:
        """1 - iter/max_iter when this head decays, else 1."""
        if not self._decay:
            return 1.0
        return self._decay_schedule(min(ctx.iteration / max(ctx.max_iter, 1), 1.0))

    def loss_key(self, part: str = "") -> str:
        return f"loss_distill_{self.name}" + (f"_{part}" if part else "")

    @staticmethod
    def select_strides(
        requested, student_shapes: Dict[int, ShapeSpec], teacher_shapes: Dict[int, ShapeSpec],
        key: str,
    ) -> List[int]:
        """The strides to distil: ``requested`` (a config list) or every common stride."""
        common = sorted(set(student_shapes) & set(teacher_shapes))
        if not common:
            raise ValueError(
                f"student strides {sorted(student_shapes)} and teacher strides "
                f"{sorted(teacher_shapes)} have nothing in common; feature distillation needs "
                "at least one shared FPN stride"
            )
        if not requested:
            return common
        missing = [s for s in requested if s not in common]
        if missing:
            raise ValueError(
                f"{key} asks for strides {missing}, which student and teacher do not both "
                f"have; shared strides are {common}"
            )
        return sorted(int(s) for s in requested)
