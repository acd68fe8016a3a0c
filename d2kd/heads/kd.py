"""Vanilla knowledge distillation on class logits (METHODS.md section 5)."""
from typing import Dict

import torch
from torch import Tensor

from ..prototypes.robust import class_logit_row_weights
from .base import DistillHead
from .functional import kl_per_row, paired_class_logits, weighted_mean
from .registry import register_head


@register_head("kd")
class KDHead(DistillHead):
    """``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, mean over the distilled rows.

    R-CNN: over the C+1 RoI-head logits of every sampled RoI (both models see the student's
    RoIs). RetinaNet: over the C class logits of every positive anchor. With ``ROBUST_WEIGHTS``,
    positive rows are weighted by their GT's GK robust weight (GK paper, Table 4).
    Produces ``loss_distill_kd``.
    """

    def __init__(self, cfg, student_shapes, teacher_shapes):
        node = cfg.DISTILL.KD
        super().__init__(cfg, node)
        self.weight = node.WEIGHT
        self.temperature = node.TEMPERATURE
        if self.temperature <= 0:
            raise ValueError(f"DISTILL.KD.TEMPERATURE must be > 0, got {self.temperature}")
        self.robust = bool(node.ROBUST_WEIGHTS)
        self.needs_prototypes = self.robust
        is_retina = "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
        self.requires = frozenset({"anchors" if is_retina else "roi"})

    def forward(self, ctx) -> Dict[str, Tensor]:
        student, teacher = paired_class_logits(ctx)
        if self.robust:
            weights = class_logit_row_weights(ctx)
        else:
            weights = torch.ones(student.shape[0], device=student.device)
        loss = weighted_mean(kl_per_row(student, teacher, self.temperature), weights)
        return {self.loss_key(): loss * (self.weight * self.decay_factor(ctx))}
