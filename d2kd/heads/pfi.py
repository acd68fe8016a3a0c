"""Prediction-guided Feature Imitation (Li et al., AAAI 2022; docs/METHODS.md section 4)."""
from typing import Dict

from detectron2.config import CfgNode as CN
from torch import Tensor

from ..structures import STUDENT, TEACHER
from .adapters import StrideAdapters
from .base import DistillHead
from .functional import SCORE_KINDS, crop_to_common
from .registry import DISTILL_HEAD_REGISTRY


def prediction_difference(student_cls: Tensor, teacher_cls: Tensor, sigmoid: bool = True) -> Tensor:
    """PFI's map ``P = mean over channels of (cls_s - cls_t)^2``, detached.

    The channels of a dense class map are its A anchors x C classes (``a * C + c``), so the
    mean runs over both: one P per cell, the mean over the cell's anchors of their mean
    squared class difference.

    Args:
        student_cls, teacher_cls (Tensor): (N, A*C, H, W) class logits of one level.
        sigmoid (bool): compare class probabilities (True) or logits.
    Returns:
        Tensor: (N, H, W), fp32, without gradient.
    """
    s, t = student_cls.detach().float(), teacher_cls.detach().float()
    if sigmoid:
        s, t = s.sigmoid(), t.sigmoid()
    return ((s - t) ** 2).mean(dim=1)


@DISTILL_HEAD_REGISTRY.register()
class PFIHead(DistillHead):
    """Feature imitation where the predictions differ.

    Per shared stride: ``P`` from :func:`prediction_difference` (the two models' class maps of
    that level), and ``sum_ij P_ij * mean_c (F_t - A(F_s))^2_ij / (N H W)`` (a mean over the
    cells); the levels are averaged. ``A`` is a 1x1 conv adapter by default (no official code;
    the paper's adaptation layer). Produces ``loss_distill_pfi``.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.PFI``, this head's keys and their defaults."""
        _C = cfg
        # Prediction-guided Feature Imitation (docs/METHODS.md section 4): feature imitation per cell
        # weighted by the detached squared class-prediction difference (dense students).
        _C.DISTILL.PFI = CN()
        _C.DISTILL.PFI.WEIGHT = 1.5
        # Predictions compared: "sigmoid" (class probabilities) or "logits".
        _C.DISTILL.PFI.SCORES = "sigmoid"
        _C.DISTILL.PFI.STRIDES = []
        # Student-side adapter A: "always" or "auto" (only when channels differ).
        _C.DISTILL.PFI.ADAPTER = "always"
        _C.DISTILL.PFI.ADAPTER_KERNEL = 1
        _C.DISTILL.PFI.ADAPTER_RELU = False
        _C.DISTILL.PFI.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.PFI
        self.weight = node.WEIGHT
        self.sigmoid = self.choice(node.SCORES, SCORE_KINDS, "DISTILL.PFI.SCORES") == "sigmoid"
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.PFI.STRIDES")
        self.adapters = StrideAdapters(
            self.strides, student_shapes, teacher_shapes, node.ADAPTER, node.ADAPTER_KERNEL, node.ADAPTER_RELU
        )
        self.requires = frozenset({
            "student.features", "teacher.features", "student.dense", "teacher.dense", "paired_anchors",
        })

    def forward(self, ctx) -> Dict[str, Tensor]:
        cls_s, cls_t = ctx.dense(STUDENT).cls_maps, ctx.dense(TEACHER).cls_maps
        missing = [s for s in self.strides if s not in cls_s or s not in cls_t]
        if missing:
            raise ValueError(
                f"PFI distils strides {self.strides}, but the dense heads predict at {sorted(cls_s)} "
                f"only (missing {missing}); set DISTILL.PFI.STRIDES to strides the heads read"
            )
        total = 0.0
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            p_s, p_t = crop_to_common(cls_s[s], cls_t[s])
            h, w = min(student.shape[-2], p_s.shape[-2]), min(student.shape[-1], p_s.shape[-1])
            weight = prediction_difference(p_s[..., :h, :w], p_t[..., :h, :w], self.sigmoid)
            sq = ((student[..., :h, :w].float() - teacher[..., :h, :w].float()) ** 2).mean(dim=1)
            total = total + (weight * sq).mean()
        loss = total / len(self.strides)
        return {self.loss_key(): loss * (self.weight * self.decay_factor(ctx))}
