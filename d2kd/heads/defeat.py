"""DeFeat: decoupled foreground / background distillation (docs/METHODS.md section 5)."""
from typing import Dict

from detectron2.config import CfgNode as CN
from torch import Tensor

from .adapters import StrideAdapters
from .base import DistillHead
from .functional import class_logit_requirements, crop_to_common, kl_per_row, paired_class_logits
from .registry import DISTILL_HEAD_REGISTRY
from .robust_weights import instance_weight_map, step_instances


def split_kl(kl: Tensor, foreground: Tensor):
    """Means of the per-RoI KL over the foreground and over the background RoIs, each over
    its own count (0, still in the graph, where a side has none)."""
    fg = foreground.float()
    bg = 1.0 - fg
    return (kl * fg).sum() / fg.sum().clamp(min=1.0), (kl * bg).sum() / bg.sum().clamp(min=1.0)


@DISTILL_HEAD_REGISTRY.register()
class DeFeatHead(DistillHead):
    """DeFeat's four terms.

    - ``loss_distill_defeat_fg`` / ``_bg``: GK's decoupled feature terms (Eq. 7) through an
      adapter, ``sum((A(F_s) - F_t)^2 * M) / max(1, 2 C sum(M))``, M the cells covered by the
      GT boxes assigned to that stride (the authors' level rule), background the rest;
      averaged over strides, as DeFeat's code does for both detector kinds. With
      ``ROBUST_WEIGHTS`` the foreground cells carry the boxes' GK robust weights (GK paper,
      Table 4), exactly as GK's own term.
    - ``loss_distill_defeat_kl_fg`` / ``_kl_bg`` (two-stage students): ``T^2 KL(p_t || p_s)``
      summed over the C+1 classes, averaged over the foreground RoIs and, separately, over
      the background RoIs of the student's sampled RoIs (the teacher's box head runs on
      them). Dense students get the feature terms only (DeFeat's code distils RetinaNet's
      FPN features alone).
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.DEFEAT``, this head's keys and their defaults."""
        _C = cfg
        # DeFeat: decoupled fg / bg feature imitation plus fg / bg RoI KL (docs/METHODS.md section 5).
        _C.DISTILL.DEFEAT = CN()
        # Feature terms (GK's fg / bg normalisation, levels averaged); DeFeat's VOC config: 3 / 12.
        _C.DISTILL.DEFEAT.FG_WEIGHT = 3.0
        _C.DISTILL.DEFEAT.BG_WEIGHT = 12.0
        # RoI-head KL over foreground and over background RoIs, each a mean over its own RoIs
        # (two-stage students only; 0 for both lets a dense teacher teach a two-stage student).
        _C.DISTILL.DEFEAT.KL_FG_WEIGHT = 2.0
        _C.DISTILL.DEFEAT.KL_BG_WEIGHT = 2.0
        _C.DISTILL.DEFEAT.TEMPERATURE = 1.0
        _C.DISTILL.DEFEAT.STRIDES = []
        # Student-side adapter, always present (DeFeat's code: 3x3 conv, no ReLU).
        _C.DISTILL.DEFEAT.ADAPTER_KERNEL = 3
        _C.DISTILL.DEFEAT.ADAPTER_RELU = False
        # Weight the foreground cells by the GT boxes' GK robust weights (GK paper, Table 4).
        _C.DISTILL.DEFEAT.ROBUST_WEIGHTS = False
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY (feature terms only, as GK's).
        _C.DISTILL.DEFEAT.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.DEFEAT
        self.two_stage = self.student_kind(cfg) == "two_stage"
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.DEFEAT.STRIDES")
        self.adapters = StrideAdapters(
            self.strides, student_shapes, teacher_shapes, "always", node.ADAPTER_KERNEL, node.ADAPTER_RELU
        )
        self.fg_weight, self.bg_weight = node.FG_WEIGHT, node.BG_WEIGHT
        self.kl_fg_weight, self.kl_bg_weight = node.KL_FG_WEIGHT, node.KL_BG_WEIGHT
        self.temperature = node.TEMPERATURE
        self.robust = bool(node.ROBUST_WEIGHTS)
        self.with_kl = self.two_stage and (self.kl_fg_weight > 0 or self.kl_bg_weight > 0)
        requires = {"student.features", "teacher.features"}
        if self.robust:
            requires.add("prototypes")
        if self.with_kl:
            requires |= class_logit_requirements(True)
        self.requires = frozenset(requires)

    def forward(self, ctx) -> Dict[str, Tensor]:
        decay = self.decay_factor(ctx)
        instances = step_instances(ctx, "gt")
        loss_fg = ctx.zero_loss()
        loss_bg = loss_fg
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            sq = ((student.float() - teacher.float()) ** 2).sum(dim=1)  # (N, H, W), summed over C
            channels = teacher.shape[1]
            weights, covered = instance_weight_map(ctx, instances, s, sq.shape[-2:])
            fg = weights if self.robust else covered.float()
            bg = (~covered).float()
            loss_fg = loss_fg + (sq * fg).sum() / (2 * channels * fg.sum()).clamp(min=1.0)
            loss_bg = loss_bg + (sq * bg).sum() / (2 * channels * bg.sum()).clamp(min=1.0)
        levels = len(self.strides)
        losses = {
            self.loss_key("fg"): loss_fg / levels * (self.fg_weight * decay),
            self.loss_key("bg"): loss_bg / levels * (self.bg_weight * decay),
        }
        if self.with_kl:
            student, teacher, _ = paired_class_logits(ctx, True, "all")
            kl_fg, kl_bg = split_kl(kl_per_row(student, teacher, self.temperature), ctx.rois.foreground)
            losses[self.loss_key("kl_fg")] = kl_fg * self.kl_fg_weight
            losses[self.loss_key("kl_bg")] = kl_bg * self.kl_bg_weight
        return losses
