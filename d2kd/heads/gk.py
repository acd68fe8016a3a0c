"""Global Knowledge distillation: GK's robust distillation module (docs/METHODS.md 1.4-1.5)."""
from dataclasses import replace
from typing import Dict

import torch
from detectron2.config import CfgNode as CN
from detectron2.utils.events import get_event_storage
from torch import Tensor

from .adapters import StrideAdapters
from .base import DistillHead
from .functional import class_logit_requirements, crop_to_common, kl_per_row, paired_class_logits, weighted_mean
from .registry import DISTILL_HEAD_REGISTRY
from .robust_weights import GLOBAL_FORMS, INSTANCE_SOURCES, global_relation_loss, instance_weight_map, step_instances


@DISTILL_HEAD_REGISTRY.register()
class GKHead(DistillHead):
    """The three RDM terms of GK.

    - ``loss_distill_gk_global`` (Eq. 6), from the cosines of each instance assigned to a
      stride to all prototypes (all classes) of that stride, student space vs teacher space.
      ``GLOBAL_FORM "cosine"``: per stride, smooth-L1 mean over the elements of the
      robust-weighted rows, summed over strides (the authors' code). ``"projection"``: Eq. 5's
      coefficients (consistency weight ``DISTILL.PROTOTYPES.ALPHA``), per instance its robust
      weight times the smooth-L1 distance of its coefficients summed over the prototypes,
      summed over strides and divided by the number of instances (the paper's text).
    - ``loss_distill_gk_fg`` / ``_bg``: decoupled feature imitation through an adapter,
      ``sum((A(F_s) - F_t)^2 * M) / max(1, 2 C sum(M))`` (a mean over channels); foreground
      cells weighted by the robust weight of the instance assigned to that stride that covers
      them (Eq. 7). Levels are averaged for two-stage students, summed for dense ones, as
      the authors do.
    - ``loss_distill_gk_response``: T^2 KL between the models' class distributions, mean over
      classes, on the student's positive (or all) RoIs, or on the positive anchors; foreground
      rows weighted by their robust weight, mean over rows.

    Instances are the positive sampled RoIs (two-stage, the authors' choice) or the GT boxes
    (``DISTILL.GK.INSTANCES``). Until the prototype bank is first built, robust weights are 1
    and the global term is 0; ``ROBUST_WEIGHTS False`` keeps them 1 in every term (the paper's
    ablation without prototype weights). With LINEAR_DECAY the global and feature terms decay to 0 (the
    reference COCO config); the response term does not.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.GK``, this head's keys and their defaults."""
        _C = cfg
        # Global Knowledge distillation (GK's RDM, docs/METHODS.md section 1.4-1.5).
        _C.DISTILL.GK = CN()
        # Paper weights (global, local feature, local response) = (1, 1, 5).
        _C.DISTILL.GK.GLOBAL_WEIGHT = 1.0
        _C.DISTILL.GK.FEATURE_WEIGHT = 1.0
        _C.DISTILL.GK.RESPONSE_WEIGHT = 5.0
        # Relative weights of the foreground and background parts of the local feature loss.
        _C.DISTILL.GK.FG_WEIGHT = 1.0
        _C.DISTILL.GK.BG_WEIGHT = 4.0
        _C.DISTILL.GK.TEMPERATURE = 2.0
        _C.DISTILL.GK.STRIDES = []
        # Student-side adapter before the feature term: a kernel x kernel conv, then "relu",
        # "none", or "auto" (the authors': none for two-stage students, ReLU for dense ones).
        _C.DISTILL.GK.ADAPTER_KERNEL = 3
        _C.DISTILL.GK.ADAPTER_ACTIVATION = "auto"
        # Instances for the mask, robust weights and global term: "positive_rois" (the student's
        # foreground sampled RoIs with their matched classes, the authors' Faster R-CNN choice),
        # "gt" (GT boxes), or "auto" (positive_rois for two-stage students, gt for dense ones).
        _C.DISTILL.GK.INSTANCES = "auto"
        # Rows of the response KL for two-stage students: "positive" RoIs (authors) or "all".
        _C.DISTILL.GK.RESPONSE_ROIS = "positive"
        # Feature term over levels: "mean", "sum", or "auto" (authors: mean two-stage, sum dense).
        _C.DISTILL.GK.LEVEL_REDUCTION = "auto"
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the reference decays global and feature terms only).
        _C.DISTILL.GK.DECAY = True
        # Global term (Eq. 6): "cosine" (smooth-L1 element mean of the robust-weighted rows of
        # instance-to-prototype cosines, the authors' code) or "projection" (the paper's text: Eq. 5's
        # coefficients with DISTILL.PROTOTYPES.ALPHA, summed over prototypes, divided by the instances).
        _C.DISTILL.GK.GLOBAL_FORM = "cosine"
        # Robust weights (Eq. 8) on the mask, the response rows and the global term; False: all 1.
        _C.DISTILL.GK.ROBUST_WEIGHTS = True

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.GK
        self.two_stage = self.student_kind(cfg) == "two_stage"
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.GK.STRIDES")
        activation = self.choice(node.ADAPTER_ACTIVATION, ("auto", "relu", "none"), "DISTILL.GK.ADAPTER_ACTIVATION")
        if activation == "auto":  # the authors: no ReLU for Faster R-CNN, ReLU for one-stage
            activation = "none" if self.two_stage else "relu"
        self.adapters = StrideAdapters(
            self.strides, student_shapes, teacher_shapes, "always", node.ADAPTER_KERNEL, relu=activation == "relu"
        )
        instances = self.choice(node.INSTANCES, ("auto",) + INSTANCE_SOURCES, "DISTILL.GK.INSTANCES")
        if instances == "auto":
            instances = "positive_rois" if self.two_stage else "gt"
        if instances == "positive_rois" and not self.two_stage:
            raise ValueError(
                "DISTILL.GK.INSTANCES 'positive_rois' needs a two-stage student (RoIs); use 'gt' "
                "or 'auto' for a dense student"
            )
        self.instances = instances
        self.response_rows = self.choice(node.RESPONSE_ROIS, ("positive", "all"), "DISTILL.GK.RESPONSE_ROIS")
        reduction = self.choice(node.LEVEL_REDUCTION, ("auto", "mean", "sum"), "DISTILL.GK.LEVEL_REDUCTION")
        self.level_mean = reduction == "mean" or (reduction == "auto" and self.two_stage)
        self.global_weight = node.GLOBAL_WEIGHT
        self.global_form = self.choice(node.GLOBAL_FORM, GLOBAL_FORMS, "DISTILL.GK.GLOBAL_FORM")
        self.alpha = cfg.DISTILL.PROTOTYPES.ALPHA
        self.robust = bool(node.ROBUST_WEIGHTS)
        self.fg_weight = node.FEATURE_WEIGHT * node.FG_WEIGHT
        self.bg_weight = node.FEATURE_WEIGHT * node.BG_WEIGHT
        self.response_weight = node.RESPONSE_WEIGHT
        self.temperature = node.TEMPERATURE
        requires = {"student.features", "teacher.features", "prototypes"}
        if instances == "positive_rois":
            requires.add("student.rois")
        if self.response_weight > 0:
            # The response term compares the two models' class predictions; a heterogeneous
            # pair can still use GK with DISTILL.GK.RESPONSE_WEIGHT 0.
            requires |= class_logit_requirements(self.two_stage)
            self.requirement_hint = (
                "set DISTILL.GK.RESPONSE_WEIGHT 0 (now "
                f"{self.response_weight:g}): GK's feature and global terms need features alone"
            )
        self.requires = frozenset(requires)

    def forward(self, ctx) -> Dict[str, Tensor]:
        decay = self.decay_factor(ctx)
        instances = step_instances(ctx, self.instances)
        if not self.robust:  # a copy: other heads share the step's instances
            instances = replace(instances, weight=torch.ones_like(instances.weight))
        zero = ctx.zero_loss()
        loss_fg, loss_bg = zero, zero
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            sq = ((student.float() - teacher.float()) ** 2).sum(dim=1)  # (N, H, W), summed over C
            channels = teacher.shape[1]
            fg, covered = instance_weight_map(ctx, instances, s, sq.shape[-2:])
            bg = (~covered).float()
            loss_fg = loss_fg + (sq * fg).sum() / (2 * channels * fg.sum()).clamp(min=1.0)
            loss_bg = loss_bg + (sq * bg).sum() / (2 * channels * bg.sum()).clamp(min=1.0)
        loss_global = global_relation_loss(ctx, instances, self.strides, self.global_form, self.alpha)
        if self.level_mean:
            loss_fg, loss_bg = loss_fg / len(self.strides), loss_bg / len(self.strides)
        losses = {
            self.loss_key("global"): loss_global * (self.global_weight * decay),
            self.loss_key("fg"): loss_fg * (self.fg_weight * decay),
            self.loss_key("bg"): loss_bg * (self.bg_weight * decay),
        }
        if self.response_weight > 0:
            losses[self.loss_key("response")] = self._response(ctx) * self.response_weight
        self._log(instances)
        return losses

    def _response(self, ctx) -> Tensor:
        student, teacher, weights = paired_class_logits(ctx, self.two_stage, self.response_rows, robust=self.robust)
        # docs/METHODS.md 1.5: KL "mean over classes", so divide the per-row sum by the class count.
        kl = kl_per_row(student, teacher, self.temperature) / student.shape[-1]
        return weighted_mean(kl, weights)

    @staticmethod
    def _log(instances) -> None:
        if instances.features:
            index = torch.cat([v[0] for v in instances.features.values()])
            get_event_storage().put_scalar("distill/gk_mean_robust_weight", instances.weight[index].mean().item())
