"""FGD: focal and global distillation (Yang et al., "Focal and Global Knowledge Distillation for
Detectors", CVPR 2022): attention-weighted imitation split at the GT boxes, attention
imitation, and a GcBlock relation term."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from torch import Tensor, nn

from ..value_checks import check_distill_values
from .adapters import StrideAdapters
from .base import DistillHead
from .functional import crop_to_common
from .registry import DISTILL_HEAD_REGISTRY

# The released configs' (fg alpha, bg beta, attention gamma, global lambda), by student kind.
DEFAULT_WEIGHTS = {"two_stage": (5e-5, 2.5e-5, 5e-5, 5e-7), "dense": (1e-3, 5e-4, 5e-4, 5e-6)}


def authors_strides(requested, kind: str, student_shapes, teacher_shapes, key: str) -> List[int]:
    """``requested`` strides, or the levels FGD's and MGD's released configs hook: every
    shared stride up to 32 for two-stage students (mmdetection's ``fpn_convs`` P2-P5; P6 is a
    max-pool of P5 there, as in detectron2), every shared stride for dense ones (P3-P7)."""
    strides = DistillHead.select_strides(requested, student_shapes, teacher_shapes, key)
    if requested or kind != "two_stage":
        return strides
    return [s for s in strides if s <= 32] or strides


def fgd_attention(x: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """FGD's spatial and channel attention of a map.

    ``A^S = H W softmax_cells(mean_c |x| / T)`` and ``A^C = C softmax_channels(mean_cells |x| / T)``.

    Args:
        x (Tensor): (N, C, H, W).
    Returns:
        (Tensor, Tensor): (N, H, W) spatial and (N, C) channel attention, fp32.
    """
    n, c, h, w = x.shape
    value = x.float().abs()
    spatial = (h * w) * F.softmax(value.mean(dim=1).flatten(1) / temperature, dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.view(n, h, w), channel


def fgd_masks(boxes: Sequence[Tensor], stride: int, size) -> Tuple[Tensor, Tensor]:
    """FGD's foreground and background masks at one stride.

    Each box (input pixels) covers the cells ``floor(x1/s) .. ceil(x2/s)`` and
    ``floor(y1/s) .. ceil(y2/s)``, both ends included, as the authors index them, and writes
    ``1 / (cells high * cells wide)`` there (counted before clipping to the map, as theirs),
    the largest value where boxes overlap. The background is 1 on every uncovered cell,
    divided by their number in the image (all zero when none is left).

    Args:
        boxes (list[Tensor]): per image, (m_i, 4) XYXY boxes in input pixels.
        size: (H, W) of the map.
    Returns:
        (Tensor, Tensor): (N, H, W) foreground and background masks, fp32.
    """
    h, w = int(size[0]), int(size[1])
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    fg = torch.zeros(len(boxes), h, w, device=device)
    for i, b in enumerate(boxes):
        if len(b) == 0:
            continue
        b = b.float() / stride
        x0, y0 = torch.floor(b[:, 0]).long(), torch.floor(b[:, 1]).long()
        x1, y1 = torch.ceil(b[:, 2]).long(), torch.ceil(b[:, 3]).long()
        area = 1.0 / ((y1 + 1 - y0) * (x1 + 1 - x0)).float()
        inside = ((ys >= y0[:, None]) & (ys <= y1[:, None]))[:, :, None] & (
            (xs >= x0[:, None]) & (xs <= x1[:, None])
        )[:, None, :]
        fg[i] = (inside.float() * area[:, None, None]).amax(dim=0)
    bg = (fg <= 0).float()
    bg = bg / bg.flatten(1).sum(dim=1).clamp(min=1.0)[:, None, None]
    return fg, bg


def fgd_feature_losses(student: Tensor, teacher: Tensor, fg: Tensor, bg: Tensor,
                       spatial_t: Tensor, channel_t: Tensor) -> Tuple[Tensor, Tensor]:
    """FGD's focal terms: ``sum(M A^S_t A^C_t (F_t - F_s)^2) / N`` with M the foreground or the
    background mask, the teacher's attention on both.

    Args:
        student, teacher (Tensor): (N, C, H, W).
        fg, bg, spatial_t (Tensor): (N, H, W). channel_t (Tensor): (N, C).
    """
    n = teacher.shape[0]
    sq = (teacher.float() - student.float()) ** 2 * spatial_t[:, None] * channel_t[:, :, None, None]
    return (sq * fg[:, None]).sum() / n, (sq * bg[:, None]).sum() / n


def fgd_attention_loss(spatial_s: Tensor, channel_s: Tensor, spatial_t: Tensor, channel_t: Tensor) -> Tensor:
    """``sum|A^C_t - A^C_s| / N + sum|A^S_t - A^S_s| / N`` (L1, summed, averaged over images)."""
    n = spatial_t.shape[0]
    return ((channel_t - channel_s).abs().sum() + (spatial_t - spatial_s).abs().sum()) / n


class GcBlock(nn.Module):
    """The global-context block of FGD's relation term (GCNet's): a 1x1 conv gives softmax
    weights over the cells, the weighted sum of the cells goes through conv(C -> C/2),
    LayerNorm, ReLU, conv(C/2 -> C) and is added to every cell.

    Init as the authors': the context conv Kaiming-normal (fan in, bias 0), the last conv of
    the transform zero (so the block starts as the identity), the rest PyTorch's default.
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 2, 1)
        self.context = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )
        nn.init.kaiming_normal_(self.context.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        weights = F.softmax(self.context(x).flatten(2), dim=-1)  # (N, 1, HW)
        pooled = torch.bmm(x.flatten(2), weights.transpose(1, 2)).view(n, c, 1, 1)
        return x + self.transform(pooled)


@DISTILL_HEAD_REGISTRY.register()
class FGDHead(DistillHead):
    """FGD's four terms per stride, each summed over strides and weighted:

    - ``loss_distill_fgd_fg`` / ``_bg``: ``sum(M A^S_t A^C_t (F_t - A(F_s))^2) / N``,
      M the box-area foreground mask or the count-normalised background mask
      (:func:`fgd_masks`), the teacher's spatial and channel attention (:func:`fgd_attention`,
      temperature ``TEMPERATURE``).
    - ``loss_distill_fgd_attention``: L1 between the two models' spatial and channel
      attention, summed, / N.
    - ``loss_distill_fgd_global``: ``sum((GC_t(F_t) - GC_s(A(F_s)))^2) / N``, one GcBlock per
      model and stride, both trained by this term (the teacher's block too).

    ``A`` is a 1x1 adapter where the channels differ (the authors' ``align``); the student's
    attention is taken after it, as theirs. N is the images of the step. The weights follow
    the student's kind (``DISTILL.FGD.TWO_STAGE`` / ``.DENSE``, the released configs'); strides
    as :func:`authors_strides`.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.FGD``, this head's keys and their defaults."""
        _C = cfg
        # FGD: focal (fg/bg, attention) and global (GcBlock) distillation on FPN maps.
        _C.DISTILL.FGD = CN()
        # Temperature T of the spatial and channel attention softmaxes (released: 0.5).
        _C.DISTILL.FGD.TEMPERATURE = 0.5
        # Strides to distil; empty: the released ones (two-stage 4-32, dense every shared stride).
        _C.DISTILL.FGD.STRIDES = []
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the released configs do not decay).
        _C.DISTILL.FGD.DECAY = False
        for kind, where in (("two_stage", "Faster R-CNN"), ("dense", "RetinaNet")):
            fg, bg, attention, relation = DEFAULT_WEIGHTS[kind]
            node = CN()
            # Weights for this kind of student (the node named after the student's kind is read),
            # the released <where> config's: fg alpha, bg beta, attention gamma, global lambda.
            node.FG_WEIGHT = fg
            node.BG_WEIGHT = bg
            node.ATTENTION_WEIGHT = attention
            node.GLOBAL_WEIGHT = relation
            _C.DISTILL.FGD[kind.upper()] = node

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.FGD
        kind = self.student_kind(cfg)
        check_distill_values(cfg, [f"DISTILL.FGD.{kind.upper()}"])
        weights = node[kind.upper()]
        self.fg_weight, self.bg_weight = float(weights.FG_WEIGHT), float(weights.BG_WEIGHT)
        self.attention_weight, self.global_weight = float(weights.ATTENTION_WEIGHT), float(weights.GLOBAL_WEIGHT)
        self.temperature = float(node.TEMPERATURE)
        self.strides = authors_strides(node.STRIDES, kind, student_shapes, teacher_shapes, "DISTILL.FGD.STRIDES")
        self.adapters = StrideAdapters(self.strides, student_shapes, teacher_shapes, "auto", 1, relu=False)
        self.student_blocks = nn.ModuleDict({f"s{s}": GcBlock(teacher_shapes[s].channels) for s in self.strides})
        self.teacher_blocks = nn.ModuleDict({f"s{s}": GcBlock(teacher_shapes[s].channels) for s in self.strides})

    def forward(self, ctx) -> Dict[str, Tensor]:
        boxes = [g.gt_boxes.tensor for g in ctx.gt_instances]
        fg_loss = bg_loss = attention_loss = global_loss = ctx.zero_loss()
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            student, teacher = student.float(), teacher.float()
            spatial_t, channel_t = fgd_attention(teacher, self.temperature)
            spatial_s, channel_s = fgd_attention(student, self.temperature)
            fg, bg = fgd_masks(boxes, s, teacher.shape[-2:])
            fg_s, bg_s = fgd_feature_losses(student, teacher, fg, bg, spatial_t, channel_t)
            fg_loss = fg_loss + fg_s
            bg_loss = bg_loss + bg_s
            attention_loss = attention_loss + fgd_attention_loss(spatial_s, channel_s, spatial_t, channel_t)
            # fp32 before the sum of squares (the blocks run in half precision under autocast)
            relation_s = self.student_blocks[f"s{s}"](student).float()
            relation_t = self.teacher_blocks[f"s{s}"](teacher).float()
            global_loss = global_loss + ((relation_t - relation_s) ** 2).sum() / teacher.shape[0]
        decay = self.decay_factor(ctx)
        return {
            self.loss_key("fg"): fg_loss * (self.fg_weight * decay),
            self.loss_key("bg"): bg_loss * (self.bg_weight * decay),
            self.loss_key("attention"): attention_loss * (self.attention_weight * decay),
            self.loss_key("global"): global_loss * (self.global_weight * decay),
        }
