"""PKD: feature imitation with Pearson correlation (docs/METHODS.md section 2)."""
from typing import Dict

import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from torch import Tensor

from .adapters import StrideAdapters
from .base import DistillHead
from .registry import DISTILL_HEAD_REGISTRY

# The released configs' weights, by the student's kind (docs/METHODS.md section 2).
DEFAULT_WEIGHTS = {"two_stage": 6.0, "dense": 10.0}


def standardize_channels(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``(x_c - mean_c) / (std_c + eps)`` per channel over (N, H, W), unbiased std, in fp32."""
    x = x.float()
    flat = x.transpose(0, 1).flatten(1)  # (C, N*H*W)
    mean = flat.mean(dim=1)[None, :, None, None]
    # unbiased, as the released code (torch.std); a single cell has std 0 (no NaN)
    std = flat.std(dim=1, correction=1 if flat.shape[1] > 1 else 0)[None, :, None, None]
    return (x - mean) / (std + eps)


def pkd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``1/2 mean((S^ - T^)^2)`` of the standardised maps; the student map is resized
    bilinearly to the teacher's spatial size where they differ (never cropped).

    With unbiased std this is ``(n-1)/n * (1 - mean_c r_c)``, n = N*H*W and r_c the Pearson
    correlation of channel c of the two maps (up to the eps).
    """
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student.float(), size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    return 0.5 * ((standardize_channels(student) - standardize_channels(teacher)) ** 2).mean()


@DISTILL_HEAD_REGISTRY.register()
class PKDHead(DistillHead):
    """``WEIGHT * sum_strides pkd_loss(A(F_s), F_t)`` over the shared strides.

    Levels are paired by stride: a Faster R-CNN teacher (p2-p6) teaches a RetinaNet student
    (p3-p7) on strides 8-64, never p2 with p3 as the released config's list-position pairing
    does. By default the four finest shared strides are distilled (the released configs use
    the first four FPN outputs of homogeneous pairs). A 1x1 adapter is added only where the
    channels differ (the standardisation makes one unnecessary otherwise). With
    ``WEIGHT`` -1 the weight is the released one for the student's kind: 6 for two-stage
    students, 10 for dense ones. Produces ``loss_distill_pkd``.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.PKD``, this head's keys and their defaults."""
        _C = cfg
        # PKD: 1/2 mean((S^ - T^)^2) of per-channel standardised FPN maps (docs/METHODS.md section 2).
        _C.DISTILL.PKD = CN()
        # Loss weight; -1 picks the released one by the student's kind: 6 two-stage, 10 dense.
        _C.DISTILL.PKD.WEIGHT = -1.0
        # Strides to distil; empty means the NUM_LEVELS finest strides both models have.
        _C.DISTILL.PKD.STRIDES = []
        # With STRIDES empty: how many shared strides, finest first (released: 4); 0 means all.
        _C.DISTILL.PKD.NUM_LEVELS = 4
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the released configs do not decay).
        _C.DISTILL.PKD.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.PKD
        self.weight = float(node.WEIGHT)
        if self.weight == -1:
            self.weight = DEFAULT_WEIGHTS[self.student_kind(cfg)]
        strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.PKD.STRIDES")
        if not node.STRIDES:
            strides = strides[: node.NUM_LEVELS] if node.NUM_LEVELS else strides
        self.strides = strides
        self.adapters = StrideAdapters(self.strides, student_shapes, teacher_shapes, "auto", 1, relu=False)

    def forward(self, ctx) -> Dict[str, Tensor]:
        total = ctx.zero_loss()
        for s in self.strides:
            total = total + pkd_loss(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
        return {self.loss_key(): total * (self.weight * self.decay_factor(ctx))}
