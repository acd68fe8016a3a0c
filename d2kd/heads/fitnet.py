"""FitNet-style feature imitation over whole FPN maps (METHODS.md section 5)."""
from typing import Dict

from torch import Tensor

from ..prototypes.robust import robust_weight_map
from .adapters import StrideAdapters
from .base import DistillHead
from .functional import crop_to_common
from .registry import register_head


@register_head("fitnet")
class FitNetHead(DistillHead):
    """``WEIGHT * mean((A(F_s) - F_t)^2)`` per shared stride, summed over strides.

    With ``ROBUST_WEIGHTS`` each cell covered by a GT box is weighted by that box's GK robust
    weight (the largest where boxes overlap), background cells by 1 (GK paper, Table 4).
    Produces ``loss_distill_fitnet``.
    """

    def __init__(self, cfg, student_shapes, teacher_shapes):
        node = cfg.DISTILL.FITNET
        super().__init__(cfg, node)
        self.weight = node.WEIGHT
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.FITNET.STRIDES")
        self.adapters = StrideAdapters(
            self.strides, student_shapes, teacher_shapes, node.ADAPTER, node.ADAPTER_KERNEL, node.ADAPTER_RELU
        )
        self.robust = bool(node.ROBUST_WEIGHTS)
        self.needs_prototypes = self.robust

    def forward(self, ctx) -> Dict[str, Tensor]:
        total = 0.0
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            sq = (student.float() - teacher.float()) ** 2
            if self.robust:
                cell_weights = robust_weight_map(ctx, s, sq.shape[-2:], background=1.0)
                sq = sq * cell_weights[:, None]
            total = total + sq.mean()
        return {self.loss_key(): total * (self.weight * self.decay_factor(ctx))}
