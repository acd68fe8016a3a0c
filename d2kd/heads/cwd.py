"""CWD: channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021): each channel of an FPN map becomes a distribution over its cells."""
from typing import Dict

import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from torch import Tensor

from .adapters import StrideAdapters
from .base import DistillHead
from .functional import crop_to_common
from .registry import DISTILL_HEAD_REGISTRY


def channel_wise_divergence(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 / (N C) * sum_{n, c} KL(softmax(t_nc / T) || softmax(s_nc / T))``, each softmax over
    the H*W cells of one channel of one image (the authors' normalisation: a sum over cells,
    a mean over images and channels).

    Args:
        student, teacher (Tensor): (N, C, H, W), the same shape.
    Returns:
        Tensor: scalar, fp32.
    """
    n, c = teacher.shape[:2]
    t = temperature
    log_p_s = F.log_softmax(student.float().flatten(2) / t, dim=-1)
    log_p_t = F.log_softmax(teacher.float().flatten(2) / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() * (t * t) / (n * c)


@DISTILL_HEAD_REGISTRY.register()
class CWDHead(DistillHead):
    """``WEIGHT * sum_strides channel_wise_divergence(A(F_s), F_t, TEMPERATURE)``.

    Every shared stride by default (mmrazor's detection configs distil all five FPN outputs,
    for Faster R-CNN and RetinaNet alike, at tau 1 and weight 10). A 1x1 adapter maps the
    student's channels to the teacher's where they differ (d2kd's: mmrazor's loss needs equal
    channels); with equal channels the maps are compared as they are. Produces
    ``loss_distill_cwd``.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.CWD``, this head's keys and their defaults."""
        _C = cfg
        # CWD: T^2 KL between per-channel spatial softmaxes of FPN maps, / (N C), per stride.
        _C.DISTILL.CWD = CN()
        # Loss weight (mmrazor's detection configs, Faster R-CNN and RetinaNet: 10).
        _C.DISTILL.CWD.WEIGHT = 10.0
        # Temperature tau of the spatial softmaxes (mmrazor's detection configs: 1).
        _C.DISTILL.CWD.TEMPERATURE = 1.0
        # Strides to distil; empty means every stride both models have (the configs: all five).
        _C.DISTILL.CWD.STRIDES = []
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the released configs do not decay).
        _C.DISTILL.CWD.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.CWD
        self.weight = float(node.WEIGHT)
        self.temperature = float(node.TEMPERATURE)
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.CWD.STRIDES")
        self.adapters = StrideAdapters(self.strides, student_shapes, teacher_shapes, "auto", 1, relu=False)

    def forward(self, ctx) -> Dict[str, Tensor]:
        total = ctx.zero_loss()
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            total = total + channel_wise_divergence(student, teacher, self.temperature)
        return {self.loss_key(): total * (self.weight * self.decay_factor(ctx))}
