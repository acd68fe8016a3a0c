"""FitNet-style feature imitation over whole FPN maps (docs/METHODS.md section 5)."""
from typing import Dict

import torch
from detectron2.config import CfgNode as CN
from torch import Tensor

from .adapters import StrideAdapters
from .base import DistillHead
from .functional import crop_to_common
from .registry import DISTILL_HEAD_REGISTRY
from .robust_weights import instance_weight_map, step_instances


@DISTILL_HEAD_REGISTRY.register()
class FitNetHead(DistillHead):
    """``WEIGHT * mean((A(F_s) - F_t)^2)`` per shared stride, summed over strides.

    With ``ROBUST_WEIGHTS`` each cell covered by a GT box assigned to that stride is weighted
    by the box's GK robust weight (the largest where boxes overlap), other cells by 1 (GK
    paper, Table 4). Produces ``loss_distill_fitnet``.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.FITNET``, this head's keys and their defaults."""
        _C = cfg
        # FitNet: lambda * mean((A(F_s) - F_t)^2) over whole FPN maps (docs/METHODS.md section 5).
        _C.DISTILL.FITNET = CN()
        _C.DISTILL.FITNET.WEIGHT = 1.0
        # Strides to distil; empty means every stride that student and teacher both have.
        _C.DISTILL.FITNET.STRIDES = []
        # Adapter on the student side: "auto" (only when channels differ) or "always".
        _C.DISTILL.FITNET.ADAPTER = "auto"
        _C.DISTILL.FITNET.ADAPTER_KERNEL = 1
        _C.DISTILL.FITNET.ADAPTER_RELU = False
        # Weight the cells covered by each GT box by its GK robust weight (GK paper, Table 4).
        _C.DISTILL.FITNET.ROBUST_WEIGHTS = False
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY.
        _C.DISTILL.FITNET.DECAY = True

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.FITNET
        self.weight = node.WEIGHT
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.FITNET.STRIDES")
        self.adapters = StrideAdapters(
            self.strides, student_shapes, teacher_shapes, node.ADAPTER, node.ADAPTER_KERNEL, node.ADAPTER_RELU
        )
        self.robust = bool(node.ROBUST_WEIGHTS)
        if self.robust:
            self.requires = self.requires | {"prototypes"}

    def forward(self, ctx) -> Dict[str, Tensor]:
        total = 0.0
        instances = step_instances(ctx, "gt") if self.robust else None
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            sq = (student.float() - teacher.float()) ** 2
            if self.robust:
                weights, covered = instance_weight_map(ctx, instances, s, sq.shape[-2:])
                sq = sq * torch.where(covered, weights, torch.ones_like(weights))[:, None]
            total = total + sq.mean()
        return {self.loss_key(): total * (self.weight * self.decay_factor(ctx))}
