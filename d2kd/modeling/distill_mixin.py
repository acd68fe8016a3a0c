"""Plumbing shared by DistillRCNN and DistillRetinaNet: the hidden frozen teacher, its forward
passes, and the call of every distillation head."""
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..heads.registry import build_distill_heads
from .context import DistillContext
from .teacher import build_teacher

logger = logging.getLogger(__name__)


def model_kind(model: nn.Module) -> str:
    """"rcnn" for two-stage detectors with box heads, "dense" for anchor-based one-stage ones."""
    if hasattr(model, "roi_heads") and hasattr(model.roi_heads, "box_predictor"):
        return "rcnn"
    if hasattr(model, "head") and hasattr(model, "anchor_generator"):
        return "dense"
    return "other"


def shapes_by_stride(backbone) -> Dict[int, ShapeSpec]:
    return {s.stride: s for s in backbone.output_shape().values()}


def by_stride(backbone, features: Dict[str, Tensor]) -> Dict[int, Tensor]:
    """Re-key a backbone's name-keyed outputs ("p2", ...) by stride."""
    shapes = backbone.output_shape()
    return {shapes[name].stride: x for name, x in features.items()}


class _Hidden:
    """Holds a module outside the owner's module tree.

    An attribute that is an ``nn.Module`` is registered as a submodule, and would then be in
    ``parameters()``, ``state_dict()``, the optimizer and DDP's gradient sync. The teacher must
    be in none of them, so the meta-architecture keeps it behind this plain object.
    """

    def __init__(self, module: nn.Module):
        self.module = module


@dataclass
class DistillSetup:
    """Everything ``from_config`` builds for distillation, passed to ``__init__`` as one arg."""

    teacher: nn.Module
    teacher_cfg: object
    heads: nn.ModuleDict
    start_iter: int = 0
    max_iter: int = 1
    flip_teacher_channels: bool = False
    prototype_bank: Optional[nn.Module] = None


def build_distill_setup(cfg, student_backbone) -> DistillSetup:
    teacher, teacher_cfg = build_teacher(cfg)
    heads = build_distill_heads(cfg, shapes_by_stride(student_backbone), shapes_by_stride(teacher.backbone))
    if len(heads) == 0:
        logger.warning("DISTILL.HEADS is empty: the teacher runs but nothing is distilled")
    formats = {cfg.INPUT.FORMAT, teacher_cfg.INPUT.FORMAT}
    if len(formats) > 1 and not formats <= {"RGB", "BGR"}:
        raise ValueError(
            f"student INPUT.FORMAT {cfg.INPUT.FORMAT} and teacher INPUT.FORMAT "
            f"{teacher_cfg.INPUT.FORMAT} differ in a way d2kd cannot convert (only RGB <-> BGR)"
        )
    bank = None
    if any(getattr(h, "needs_prototypes", False) for h in heads.values()):
        from ..prototypes.bank import PrototypeBank

        bank = PrototypeBank.from_config(
            cfg, shapes_by_stride(student_backbone), shapes_by_stride(teacher.backbone)
        )
    return DistillSetup(
        teacher=teacher,
        teacher_cfg=teacher_cfg,
        heads=heads,
        start_iter=cfg.DISTILL.SCHEDULE.START_ITER,
        max_iter=cfg.SOLVER.MAX_ITER,
        flip_teacher_channels=cfg.INPUT.FORMAT != teacher_cfg.INPUT.FORMAT,
        prototype_bank=bank,
    )


class DistillMixin:
    """Mixed into a detectron2 meta-architecture (before it in the MRO).

    Adds one constructor argument, ``distill`` (a :class:`DistillSetup` that ``from_config``
    builds from ``cfg.DISTILL``), to the detector's own. In training the subclass builds a
    :class:`DistillContext` and calls ``distill_losses(ctx)``.
    """

    student_kind = "other"

    @configurable
    def __init__(self, *, distill: DistillSetup, **kwargs):
        super().__init__(**kwargs)
        self.check_student()
        self._init_distill(distill)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["distill"] = build_distill_setup(cfg, ret["backbone"])
        return ret

    def check_student(self):
        """Raise if this student's configuration is one the training step cannot serve."""

    def _init_distill(self, setup: DistillSetup):
        self._teacher = _Hidden(setup.teacher)
        self.teacher_cfg = setup.teacher_cfg
        self.distill_heads = setup.heads
        self.prototype_bank = setup.prototype_bank
        self._distill_start_iter = setup.start_iter
        self._distill_max_iter = setup.max_iter
        self._flip_teacher_channels = setup.flip_teacher_channels
        self._teacher_needs = set().union(*[h.requires for h in self.distill_heads.values()])
        self._check_head_requirements()
        self.teacher.to(self.device)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher.module

    def _check_head_requirements(self):
        t_kind = model_kind(self.teacher)
        for name, head in self.distill_heads.items():
            for need in head.requires:
                if need == "roi" and not (self.student_kind == "rcnn" and t_kind == "rcnn"):
                    raise ValueError(
                        f"distillation head '{name}' compares RoI-head outputs, so student and "
                        f"teacher must both be R-CNN detectors (student: {type(self).__name__}, "
                        f"teacher: {self.teacher_cfg.MODEL.META_ARCHITECTURE}); use a "
                        "feature head (e.g. fitnet) for this pair"
                    )
                if need == "anchors":
                    if not (self.student_kind == "dense" and t_kind == "dense"):
                        raise ValueError(
                            f"distillation head '{name}' compares per-anchor outputs, so student "
                            f"and teacher must both be one-stage detectors (student: "
                            f"{type(self).__name__}, teacher: "
                            f"{self.teacher_cfg.MODEL.META_ARCHITECTURE}); use a feature head "
                            "(e.g. fitnet) for this pair"
                        )
                    self._check_same_anchors(name)

    def _check_same_anchors(self, head_name: str):
        s_gen, t_gen = self.anchor_generator, self.teacher.anchor_generator
        s_strides, t_strides = list(s_gen.strides), list(t_gen.strides)
        same = s_strides == t_strides and all(
            a.shape == b.shape and torch.allclose(a.cpu(), b.cpu())
            for a, b in zip(s_gen.cell_anchors, t_gen.cell_anchors)
        )
        if not same:
            raise ValueError(
                f"distillation head '{head_name}' pairs student and teacher anchors one to one, "
                "but their anchor generators differ (MODEL.ANCHOR_GENERATOR sizes, aspect "
                "ratios or the FPN levels used); give both models the same anchors"
            )

    # ---- keeping the hidden teacher frozen, in eval mode and on the student's device ----
    def train(self, mode: bool = True):
        super().train(mode)
        # SimpleTrainer calls model.train(); BatchNorm statistics of the teacher must not move.
        self.teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() reach submodules through _apply; the teacher is not one.
        super()._apply(fn, *args, **kwargs)
        if "_teacher" in self.__dict__:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    # ---- teacher forward passes (no_grad: teacher tensors never receive gradients) ----
    @torch.no_grad()
    def teacher_backbone(self, batched_inputs: List[dict]) -> Dict[str, Tensor]:
        """The teacher's FPN outputs, name-keyed, on its own preprocessing of the raw batch."""
        if self._flip_teacher_channels:
            batched_inputs = [{"image": x["image"].flip(0)} for x in batched_inputs]
        images = self.teacher.preprocess_image(batched_inputs)
        return self.teacher.backbone(images.tensor)

    @torch.no_grad()
    def teacher_roi_outputs(self, teacher_features: Dict[str, Tensor], proposals):
        """The teacher's box-head (class logits, box deltas) on the given (student's) RoIs."""
        roi_heads = self.teacher.roi_heads
        x = roi_heads.box_pooler(
            [teacher_features[f] for f in roi_heads.box_in_features],
            [p.proposal_boxes for p in proposals],
        )
        return roi_heads.box_predictor(roi_heads.box_head(x))

    @torch.no_grad()
    def teacher_dense_outputs(self, teacher_features: Dict[str, Tensor]):
        """The teacher's per-anchor (class logits, box outputs), each stride -> (N, HWA, K)."""
        teacher = self.teacher
        feats = [teacher_features[f] for f in teacher.head_in_features]
        logits, box_reg = teacher.head(feats)
        return dense_by_stride(teacher, logits, box_reg)

    # ---- the distillation step ----
    def distillation_active(self, iteration: int) -> bool:
        return iteration >= self._distill_start_iter and len(self.distill_heads) > 0

    def idle_distill_losses(self) -> Dict[str, Tensor]:
        """Before START_ITER: a zero term over every trainable distillation parameter.

        DDP (without find_unused_parameters) requires every trainable parameter to get a
        gradient each step; a zero-weighted term keeps the adapters in the graph.
        """
        params = [p for p in self.distill_heads.parameters() if p.requires_grad]
        if not params:
            return {}
        return {"loss_distill_idle": sum(p.sum() for p in params) * 0.0}

    def make_context(self, batched_inputs, images, student_features: Dict[str, Tensor], gt_instances, **fields):
        """Run the teacher's backbone and start the step's context with what every
        meta-architecture shares; ``fields`` adds the meta-architecture's own.

        Returns:
            (DistillContext, dict[str, Tensor]): the context, and the teacher's name-keyed
            FPN outputs (for its head passes).
        """
        teacher_features = self.teacher_backbone(batched_inputs)
        ctx = DistillContext(
            student_features=by_stride(self.backbone, student_features),
            teacher_features=by_stride(self.teacher.backbone, teacher_features),
            gt_instances=gt_instances,
            image_sizes=images.image_sizes,
            iteration=get_event_storage().iter,
            max_iter=self._distill_max_iter,
            prototype_bank=self.prototype_bank,
            **fields,
        )
        return ctx, teacher_features

    def distill_losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        losses = {}
        for name, head in self.distill_heads.items():
            for key, value in head(ctx).items():
                if not torch.isfinite(value).all():
                    raise FloatingPointError(
                        f"distillation loss {key} (head '{name}') is {value.detach().cpu()} at "
                        f"iteration {ctx.iteration}; the other losses were finite"
                    )
                losses[key] = value
        return losses


def dense_by_stride(model, logits: List[Tensor], box_reg: List[Tensor]):
    """Per-level dense head outputs (N, A*K, H, W) -> stride -> (N, H*W*A, K).

    The box branch's K is read off the tensor (4 for deltas, more for distributional heads
    such as LD's), not assumed.
    """
    strides = [model.backbone.output_shape()[f].stride for f in model.head_in_features]
    num_anchors = model.anchor_generator.num_cell_anchors
    cls_out, box_out = {}, {}
    for s, a, lg, bx in zip(strides, num_anchors, logits, box_reg):
        cls_out[s] = permute_to_N_HWA_K(lg, lg.shape[1] // a)
        box_out[s] = permute_to_N_HWA_K(bx, bx.shape[1] // a)
    return cls_out, box_out
