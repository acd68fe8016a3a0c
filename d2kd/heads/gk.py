"""Global Knowledge distillation: GK's robust distillation module (METHODS.md section 1.4-1.5)."""
from typing import Dict

import torch
from detectron2.utils.events import get_event_storage
from fvcore.nn import smooth_l1_loss
from torch import Tensor

from ..prototypes.robust import (
    class_logit_row_weights,
    coverage_map,
    gt_features,
    gt_robust_weights,
    robust_weight_map,
)
from .adapters import StrideAdapters
from .base import DistillHead
from .functional import crop_to_common, kl_per_row, paired_class_logits, weighted_mean
from .registry import register_head


@register_head("gk")
class GKHead(DistillHead):
    """The three RDM terms, per shared stride, summed over strides.

    - ``loss_distill_gk_global``: smooth-L1 between the robust-weighted rows of cosines of each
      GT instance to all prototypes (all classes), student space vs teacher space (Eq. 6).
    - ``loss_distill_gk_fg`` / ``_bg``: decoupled feature imitation through a conv+ReLU
      adapter; foreground cells weighted by the robust weight of the GT box assigned to the
      stride that covers them (Eq. 7).
    - ``loss_distill_gk_response``: T^2 KL between the models' class distributions, mean over
      classes, on the student's RoIs (R-CNN) or positive anchors (RetinaNet), foreground rows
      weighted by their robust weight.

    Until the prototype bank is first built, robust weights are 1 and the global term is 0.
    With LINEAR_DECAY the global and feature terms decay to 0 (the reference COCO config);
    the response term does not.
    """

    needs_prototypes = True

    def __init__(self, cfg, student_shapes, teacher_shapes):
        node = cfg.DISTILL.GK
        super().__init__(cfg, node)
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.GK.STRIDES")
        self.adapters = StrideAdapters(
            self.strides, student_shapes, teacher_shapes, "always", node.ADAPTER_KERNEL, relu=True
        )
        self.global_weight = node.GLOBAL_WEIGHT
        self.fg_weight = node.FEATURE_WEIGHT * node.FG_WEIGHT
        self.bg_weight = node.FEATURE_WEIGHT * node.BG_WEIGHT
        self.response_weight = node.RESPONSE_WEIGHT
        self.temperature = node.TEMPERATURE
        if self.temperature <= 0:
            raise ValueError(f"DISTILL.GK.TEMPERATURE must be > 0, got {self.temperature}")
        if self.response_weight > 0:
            # The response term compares the two models' class predictions; a heterogeneous
            # pair can still use GK with DISTILL.GK.RESPONSE_WEIGHT 0.
            is_retina = "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
            self.requires = frozenset({"anchors" if is_retina else "roi"})

    def forward(self, ctx) -> Dict[str, Tensor]:
        decay = self.decay_factor(ctx)
        bank = ctx.prototype_bank
        zero = ctx.student_features[self.strides[0]].new_zeros(())
        loss_global, loss_fg, loss_bg = zero, zero, zero
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            sq = ((student.float() - teacher.float()) ** 2).sum(dim=1)  # (N, H, W)
            fg = robust_weight_map(ctx, s, sq.shape[-2:], background=0.0)
            bg = (~coverage_map(ctx, s, sq.shape[-2:])).float()
            loss_fg = loss_fg + (sq * fg).sum() / (2 * fg.sum()).clamp(min=1.0)
            loss_bg = loss_bg + (sq * bg).sum() / (2 * bg.sum()).clamp(min=1.0)
            if bank is not None and bank.is_built and s in bank.strides:
                f_s, f_t = gt_features(ctx, s)
                rows_s, rows_t = bank.relation_rows(s, f_s, f_t)
                if rows_s.numel() > 0:
                    w = gt_robust_weights(ctx, s)[:, None]
                    loss_global = loss_global + smooth_l1_loss(w * rows_s, w * rows_t, beta=1.0, reduction="mean")
        losses = {
            self.loss_key("global"): loss_global * (self.global_weight * decay),
            self.loss_key("fg"): loss_fg * (self.fg_weight * decay),
            self.loss_key("bg"): loss_bg * (self.bg_weight * decay),
        }
        if self.response_weight > 0:
            losses[self.loss_key("response")] = self._response(ctx) * self.response_weight
        self._log(ctx)
        return losses

    def _response(self, ctx) -> Tensor:
        student, teacher = paired_class_logits(ctx)
        # METHODS.md 1.5: KL "mean over classes", so divide the per-row sum by the class count.
        kl = kl_per_row(student, teacher, self.temperature) / student.shape[-1]
        return weighted_mean(kl, class_logit_row_weights(ctx))

    def _log(self, ctx) -> None:
        bank = ctx.prototype_bank
        if bank is None or not bank.is_built:
            return
        weights = torch.cat([gt_robust_weights(ctx, s) for s in self.strides if s in bank.strides])
        if weights.numel():
            get_event_storage().put_scalar("distill/gk_mean_robust_weight", weights.mean().item())
