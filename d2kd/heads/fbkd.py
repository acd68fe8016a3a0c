"""FBKD: attention-guided and non-local distillation (Zhang and Ma, "Improve Object Detection
with Feature-based Knowledge Distillation: Towards Accurate and Efficient Detectors", ICLR 2021),
as the authors' released code computes it."""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from torch import Tensor, nn

from .adapters import make_adapter
from .base import DistillHead
from .functional import crop_to_common
from .registry import DISTILL_HEAD_REGISTRY


def spatial_attention(x: Tensor, temperature: float) -> Tensor:
    """``H W softmax_cells(mean_c |x| / T)``: (N, C, H, W) -> (N, 1, H, W), fp32."""
    n, _, h, w = x.shape
    logits = x.float().abs().mean(dim=1).flatten(1) / temperature
    return ((h * w) * F.softmax(logits, dim=1)).view(n, 1, h, w)


def channel_attention(x: Tensor, temperature: float) -> Tensor:
    """``C softmax_channels(mean_cells |x| / T)``: (N, C, H, W) -> (N, C, 1, 1), fp32."""
    n, c = x.shape[:2]
    logits = x.float().abs().mean(dim=(2, 3)) / temperature
    return (c * F.softmax(logits, dim=1)).view(n, c, 1, 1)


def attention_guided_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``sqrt(sum(M (F_t - F_s)^2))`` over the whole batch (an L2 norm, not its square), the
    released code's feature term; written as the norm of ``(F_t - F_s) sqrt(M)`` so that its
    gradient stays finite where the maps agree."""
    return torch.linalg.vector_norm((teacher.float() - student.float()) * mask.sqrt())


class NonLocal(nn.Module):
    """The released code's non-local block (dot-product form): ``x + W(f(x) g(x))`` with
    ``f = theta(x)^T phi(x) / P``, P the cells of the max-pooled ``phi`` and ``g`` maps (kernel
    ``pool``, clamped to the map so the coarsest levels still have a cell), ``W`` a 1x1 conv
    and a BatchNorm whose scale and shift start at 0 (the block starts as the identity).
    ``theta``, ``phi``, ``g``: 1x1 convs to ``inter`` channels, PyTorch's default init.
    """

    def __init__(self, channels: int, inter: int, pool: int):
        super().__init__()
        self.inter, self.pool = inter, pool
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.out = nn.Sequential(nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        k = max(1, min(self.pool, h, w))
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, inter)
        phi = F.max_pool2d(self.phi(x), k).flatten(2)  # (N, inter, P)
        g = F.max_pool2d(self.g(x), k).flatten(2).transpose(1, 2)  # (N, P, inter)
        relation = torch.bmm(theta, phi) / phi.shape[-1]  # (N, HW, P)
        y = torch.bmm(relation, g).transpose(1, 2).reshape(n, self.inter, h, w)
        return x + self.out(y)


def non_local_settings(stride: int, channels: int) -> Tuple[int, int]:
    """(inter channels, pool kernel) of the released code's blocks: P2 C/4 and 8, P3 C/4 and 4,
    coarser levels C/2 and 2 (their 256-channel FPN: 64/8, 64/4, 128/2)."""
    if stride <= 4:
        return max(channels // 4, 1), 8
    if stride == 8:
        return max(channels // 4, 1), 4
    return max(channels // 2, 1), 2


class FBKDLevel(nn.Module):
    """The learnable parts of one stride: the student's 1x1 feature adapter (MSRA init, the
    d2kd adapters'), channel-pool adapter (Linear C_s -> C_t), spatial-pool adapter (3x3 conv,
    1 -> 1 channel), both models' non-local blocks and the 1x1 conv after the student's."""

    def __init__(self, stride: int, student_channels: int, teacher_channels: int):
        super().__init__()
        self.feature = make_adapter(student_channels, teacher_channels, 1)
        self.channel = nn.Linear(student_channels, teacher_channels)
        self.spatial = nn.Conv2d(1, 1, 3, padding=1)
        self.student_non_local = NonLocal(student_channels, *non_local_settings(stride, student_channels))
        self.teacher_non_local = NonLocal(teacher_channels, *non_local_settings(stride, teacher_channels))
        self.non_local_adapter = nn.Conv2d(student_channels, teacher_channels, 1)


@DISTILL_HEAD_REGISTRY.register()
class FBKDHead(DistillHead):
    """FBKD's four terms per stride, summed over strides, each an L2 norm over the batch:

    - ``loss_distill_fbkd_feature``: ``sqrt(sum(M_S (F_t - A(F_s))^2))``, M_S the mean of
      the two models' spatial attention (:func:`spatial_attention`, detached); with
      ``CHANNEL_MASK`` also times the mean channel attention, which the released code
      computes and then leaves out.
    - ``loss_distill_fbkd_channel``: ``||mean_cells F_t - Linear(mean_cells F_s)||``.
    - ``loss_distill_fbkd_spatial``: ``||mean_c F_t - conv3x3(mean_c F_s)||``.
    - ``loss_distill_fbkd_nonlocal``: ``||NL_t(F_t) - conv1x1(NL_s(F_s))||``, both non-local
      blocks trained by this term.

    Every shared stride by default (the release hooks all five Faster R-CNN outputs, P2-P6).
    The learnable parts (:class:`FBKDLevel`) train with the student and are dropped at export.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.FBKD``, this head's keys and their defaults."""
        _C = cfg
        # FBKD: attention-guided imitation, pooled channel/spatial terms and non-local relations.
        _C.DISTILL.FBKD = CN()
        # Weights of the four terms (the released code's: 7e-5, 4e-3, 4e-3, 7e-5).
        _C.DISTILL.FBKD.FEATURE_WEIGHT = 7e-5
        _C.DISTILL.FBKD.CHANNEL_WEIGHT = 4e-3
        _C.DISTILL.FBKD.SPATIAL_WEIGHT = 4e-3
        _C.DISTILL.FBKD.NONLOCAL_WEIGHT = 7e-5
        # Temperature T of the spatial (and channel) attention softmaxes (released: 0.5).
        _C.DISTILL.FBKD.TEMPERATURE = 0.5
        # Also weight the feature term by the mean channel attention (the release computes it, unused).
        _C.DISTILL.FBKD.CHANNEL_MASK = False
        # Strides to distil; empty means every stride both models have (released: P2-P6).
        _C.DISTILL.FBKD.STRIDES = []
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the released code does not decay).
        _C.DISTILL.FBKD.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.FBKD
        self.weights = {
            "feature": float(node.FEATURE_WEIGHT),
            "channel": float(node.CHANNEL_WEIGHT),
            "spatial": float(node.SPATIAL_WEIGHT),
            "nonlocal": float(node.NONLOCAL_WEIGHT),
        }
        self.temperature = float(node.TEMPERATURE)
        self.channel_mask = bool(node.CHANNEL_MASK)
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.FBKD.STRIDES")
        if self.channel_mask:
            differ = [s for s in self.strides if student_shapes[s].channels != teacher_shapes[s].channels]
            if differ:
                raise ValueError(
                    f"DISTILL.FBKD.CHANNEL_MASK averages the two models' channel attention, which needs "
                    f"the same channels; strides {differ} differ (student "
                    f"{student_shapes[differ[0]].channels}, teacher {teacher_shapes[differ[0]].channels})"
                )
        self.levels = nn.ModuleDict({
            f"s{s}": FBKDLevel(s, student_shapes[s].channels, teacher_shapes[s].channels) for s in self.strides
        })

    def forward(self, ctx) -> Dict[str, Tensor]:
        terms = {name: ctx.zero_loss() for name in self.weights}
        for s in self.strides:
            level = self.levels[f"s{s}"]
            student, teacher = crop_to_common(ctx.student_features[s], ctx.teacher_features[s])
            teacher = teacher.float()
            mask = (spatial_attention(teacher, self.temperature) + spatial_attention(student, self.temperature)) / 2
            if self.channel_mask:
                mask = mask * (channel_attention(teacher, self.temperature)
                               + channel_attention(student, self.temperature)) / 2
            terms["feature"] = terms["feature"] + attention_guided_loss(level.feature(student), teacher, mask.detach())
            # each difference in fp32 (the adapters and blocks run in half precision under autocast)
            pooled = level.channel(student.float().mean(dim=(2, 3))).float()
            terms["channel"] = terms["channel"] + torch.linalg.vector_norm(teacher.mean(dim=(2, 3)) - pooled)
            spatial = level.spatial(student.float().mean(dim=1, keepdim=True)).float()
            terms["spatial"] = terms["spatial"] + torch.linalg.vector_norm(teacher.mean(dim=1, keepdim=True) - spatial)
            relation_s = level.non_local_adapter(level.student_non_local(student)).float()
            relation_t = level.teacher_non_local(teacher).float()
            terms["nonlocal"] = terms["nonlocal"] + torch.linalg.vector_norm(relation_t - relation_s)
        decay = self.decay_factor(ctx)
        return {self.loss_key(name): terms[name] * (self.weights[name] * decay) for name in self.weights}
