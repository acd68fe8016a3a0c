"""Vanilla knowledge distillation on class logits (docs/METHODS.md section 5)."""
from typing import Dict

from detectron2.config import CfgNode as CN
from torch import Tensor

from .base import DistillHead
from .functional import class_logit_requirements, kl_per_row, paired_class_logits, weighted_mean
from .registry import DISTILL_HEAD_REGISTRY


@DISTILL_HEAD_REGISTRY.register()
class KDHead(DistillHead):
    """``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, mean over the distilled rows.

    Two-stage: over the C+1 RoI-head logits of every sampled RoI (the teacher's box head runs
    on the student's RoIs). Dense: over the C class logits of every positive anchor. With
    ``ROBUST_WEIGHTS``, foreground rows are weighted by their GK robust weight (GK paper,
    Table 4). Produces ``loss_distill_kd``.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.KD``, this head's keys and their defaults."""
        _C = cfg
        # Vanilla KD on class logits: RoI logits on shared proposals (R-CNN) or positive anchors'
        # class logits (RetinaNet).
        _C.DISTILL.KD = CN()
        _C.DISTILL.KD.WEIGHT = 1.0
        _C.DISTILL.KD.TEMPERATURE = 2.0
        # Weight positive RoIs / anchors by the robust weight of their matched GT (GK Table 4).
        _C.DISTILL.KD.ROBUST_WEIGHTS = False
        _C.DISTILL.KD.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.KD
        self.weight = node.WEIGHT
        self.temperature = node.TEMPERATURE
        self.robust = bool(node.ROBUST_WEIGHTS)
        self.two_stage = self.student_kind(cfg) == "two_stage"
        self.requires = class_logit_requirements(self.two_stage) | ({"prototypes"} if self.robust else set())

    def forward(self, ctx) -> Dict[str, Tensor]:
        student, teacher, weights = paired_class_logits(ctx, self.two_stage, "all", self.robust)
        loss = weighted_mean(kl_per_row(student, teacher, self.temperature), weights)
        return {self.loss_key(): loss * (self.weight * self.decay_factor(ctx))}
