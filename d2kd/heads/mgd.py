"""MGD: masked generative distillation (Yang et al., "Masked Generative Distillation", ECCV
2022): the student's FPN map with random cells zeroed must regenerate the teacher's map."""
from typing import Dict

import torch
from detectron2.config import CfgNode as CN
from torch import Tensor, nn

from ..value_checks import InvalidValueError, check_distill_values
from .adapters import StrideAdapters
from .base import DistillHead
from .fgd import authors_strides
from .functional import crop_to_common
from .registry import DISTILL_HEAD_REGISTRY

# The released configs' (weight alpha, mask ratio lambda), by the student's kind.
DEFAULTS = {"two_stage": (5e-7, 0.45), "dense": (2e-5, 0.65)}


def random_cell_mask(like: Tensor, ratio: float) -> Tensor:
    """(N, 1, H, W) of 0 (masked, probability ``ratio``) and 1 for a map like ``like``
    (N, C, H, W): one draw per cell, shared by its channels, as the authors mask."""
    n, _, h, w = like.shape
    return (torch.rand((n, 1, h, w), device=like.device) >= ratio).to(like.dtype)


def make_generator(channels: int) -> nn.Sequential:
    """The authors' generation block: 3x3 conv, ReLU, 3x3 conv, at the teacher's width
    (PyTorch's default init, as theirs)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
    )


def mgd_loss(generated: Tensor, teacher: Tensor) -> Tensor:
    """``sum((G - F_t)^2) / N``: summed over channels and cells, averaged over images."""
    return ((generated.float() - teacher.float()) ** 2).sum() / teacher.shape[0]


@DISTILL_HEAD_REGISTRY.register()
class MGDHead(DistillHead):
    """``WEIGHT * sum_strides sum((G(M * A(F_s)) - F_t)^2) / N``.

    ``A`` is a 1x1 adapter where the channels differ (the authors' ``align``), ``M`` zeroes
    each cell with probability ``MASK_RATIO`` (drawn anew every step), ``G`` one generation
    block per stride (trained with the student, dropped at export). The weight and mask
    ratio follow the student's kind (``DISTILL.MGD.TWO_STAGE`` / ``.DENSE``: the released
    5e-7 / 0.45 and 2e-5 / 0.65). Strides as the released configs: 4-32 for two-stage
    students (mmdetection's FPN convs P2-P5; P6 is a max-pool of P5), every shared stride for
    dense ones (P3-P7). Produces ``loss_distill_mgd``.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.MGD``, this head's keys and their defaults."""
        _C = cfg
        # MGD: the masked student map regenerates the teacher's through a conv-ReLU-conv block.
        _C.DISTILL.MGD = CN()
        # Strides to distil; empty: the released ones (two-stage 4-32, dense every shared stride).
        _C.DISTILL.MGD.STRIDES = []
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the released configs do not decay).
        _C.DISTILL.MGD.DECAY = False
        # Settings by the student's kind (the node named after it is read): two-stage students.
        _C.DISTILL.MGD.TWO_STAGE = CN()
        # Loss weight alpha (the released Faster R-CNN config: 5e-7).
        _C.DISTILL.MGD.TWO_STAGE.WEIGHT = DEFAULTS["two_stage"][0]
        # Fraction lambda of cells masked, in [0, 1] (released: 0.45).
        _C.DISTILL.MGD.TWO_STAGE.MASK_RATIO = DEFAULTS["two_stage"][1]
        # Dense (one-stage) students.
        _C.DISTILL.MGD.DENSE = CN()
        # Loss weight alpha (the released RetinaNet config: 2e-5).
        _C.DISTILL.MGD.DENSE.WEIGHT = DEFAULTS["dense"][0]
        # Fraction lambda of cells masked, in [0, 1] (released: 0.65).
        _C.DISTILL.MGD.DENSE.MASK_RATIO = DEFAULTS["dense"][1]

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.MGD
        kind = self.student_kind(cfg)
        check_distill_values(cfg, [f"DISTILL.MGD.{kind.upper()}"])
        settings = node[kind.upper()]
        self.weight = float(settings.WEIGHT)
        self.mask_ratio = float(settings.MASK_RATIO)
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise InvalidValueError(
                f"invalid distillation value(s); set them in the config file or on the command line:\n"
                f"  DISTILL.MGD.{kind.upper()}.MASK_RATIO = {self.mask_ratio}: must lie in [0, 1]"
            )
        self.strides = authors_strides(node.STRIDES, kind, student_shapes, teacher_shapes, "DISTILL.MGD.STRIDES")
        self.adapters = StrideAdapters(self.strides, student_shapes, teacher_shapes, "auto", 1, relu=False)
        self.generators = nn.ModuleDict({f"s{s}": make_generator(teacher_shapes[s].channels) for s in self.strides})

    def forward(self, ctx) -> Dict[str, Tensor]:
        total = ctx.zero_loss()
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            generated = self.generators[f"s{s}"](student * random_cell_mask(student, self.mask_ratio))
            total = total + mgd_loss(generated, teacher)
        return {self.loss_key(): total * (self.weight * self.decay_factor(ctx))}
