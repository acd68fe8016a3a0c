"""BCKD (Yang et al., ICCV 2023, "Bridging Cross-task Protocol Inconsistency for Distillation
in Dense Object Detection"): binary classification distillation and IoU-based localisation
distillation, for dense students (GFL, as the paper; RetinaNet, by the same formulas).

Checked against the authors' release (TinyTigerPan/BCKD, commit 121c9aa, mmdetection 2.28:
``configs/bckd/bckd_r50_gflv1_r101_fpn_coco_1x.py``, ``LDHead.loss_single``, ``NovelKDLoss``);
the differences are listed in the README's comparison table.
"""
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils import comm
from fvcore.nn import giou_loss
from torch import Tensor

from ..structures import STUDENT, TEACHER, AnchorMatches
from ..structures.atss import box_centres
from .base import DistillHead
from .registry import DISTILL_HEAD_REGISTRY


def binary_kd_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0) -> Tensor:
    """Binary classification distillation per (anchor, class): every class score is its own
    binary problem with the teacher's sigmoid score as the soft target,
    ``BCE(sigmoid(z_s), sigmoid(z_t)) * |sigmoid(z_s) - sigmoid(z_t)|^beta``.

    BCKD's classification term and CrossKD's ``KDQualityFocalLoss`` are this function (both
    with beta 1). It is 0 where the student's logits equal the teacher's.

    Args:
        student_logits, teacher_logits (Tensor): (M, C); the teacher's is detached.
    Returns:
        Tensor: (M, C), fp32, not reduced.
    """
    z_s = student_logits.float()
    target = teacher_logits.detach().float().sigmoid()
    bce = F.binary_cross_entropy_with_logits(z_s, target, reduction="none")
    return bce * (z_s.sigmoid() - target).abs().pow(beta)


def student_capabilities(cfg) -> frozenset:
    """The capabilities of the student's detector kind, read off its meta-architecture class."""
    cls = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    kind = getattr(cls, "kind", None)
    return kind.capabilities if kind is not None else frozenset()


def positive_count(anchors: AnchorMatches, over_workers: bool) -> float:
    """mmdetection's ``avg_factor`` of these losses: the sum over images of max(positives, 1),
    averaged over workers when ``over_workers`` (its ``reduce_mean``)."""
    per_image = anchors.positive.sum(dim=1).clamp(min=1).sum().float()
    if over_workers and comm.get_world_size() > 1:
        per_image = per_image.clone()
        dist.all_reduce(per_image)
        per_image = per_image / comm.get_world_size()
    return per_image


class DenseBoxDecoder:
    """A dense head's box outputs over all anchors -> (N, R, 4) XYXY boxes in input pixels.

    - per-edge distributions (GFL: K = 4 (n + 1) channels): each edge's expected bin
      ``sum_k k softmax(z)_k`` times the level's stride, from the anchor centre;
    - deltas (RetinaNet: K = 4): detectron2's ``Box2BoxTransform`` with the student's
      ``MODEL.RETINANET.BBOX_REG_WEIGHTS`` (both models share the anchors).
    """

    def __init__(self, cfg, distribution: bool):
        self.distribution = distribution
        self.transform = None if distribution else Box2BoxTransform(weights=cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS)

    def __call__(self, box: Tensor, anchors: AnchorMatches) -> Tensor:
        all_anchors = torch.cat([anchors.anchors[s].tensor for s in anchors.strides]).to(box.device)
        n, r, k = box.shape
        if self.distribution:
            bins = k // 4
            prob = F.softmax(box.float().reshape(n, r, 4, bins), dim=-1)
            steps = torch.arange(bins, dtype=prob.dtype, device=prob.device)
            strides = torch.cat([
                torch.full((len(anchors.anchors[s]),), float(s), device=box.device) for s in anchors.strides
            ])
            dist_px = (prob @ steps) * strides[None, :, None]  # (N, R, 4) left, top, right, bottom
            centres = box_centres(all_anchors).float()[None]
            return torch.cat([centres - dist_px[..., :2], centres + dist_px[..., 2:]], dim=-1)
        boxes = self.transform.apply_deltas(box.float().reshape(n * r, k), all_anchors.float().repeat(n, 1))
        return boxes.reshape(n, r, 4)


@DISTILL_HEAD_REGISTRY.register()
class BCKDHead(DistillHead):
    """BCKD's two terms on every anchor the detector does not ignore (GFL: all anchors):

    - ``loss_distill_bckd_cls`` (``CLS_WEIGHT``, 1): :func:`binary_kd_loss` (beta
      ``CLS_BETA`` 1) summed over anchors and classes, divided by the positives
      (:func:`positive_count`);
    - ``loss_distill_bckd_loc`` (``LOC_WEIGHT``, 4): GIoU loss between the student's and the
      teacher's decoded boxes (:class:`DenseBoxDecoder`), each anchor weighted by the largest
      class-score difference ``max_c |sigmoid(z_t) - sigmoid(z_s)|`` (detached), summed and
      divided by the positives.

    The authors' config runs it with the GFL losses and nothing else (its LD, VLR and
    imitation terms are weighted 0). Needs both models of one dense kind with the same anchors.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.BCKD``, this head's keys and their defaults."""
        _C = cfg
        # BCKD (ICCV 2023): binary classification distillation + IoU-based localisation distillation
        # on every non-ignored anchor of a dense pair with the same anchors.
        _C.DISTILL.BCKD = CN()
        # Binary classification distillation (the authors' NovelKDLoss, loss_weight 1.0).
        _C.DISTILL.BCKD.CLS_WEIGHT = 1.0
        # Its modulating exponent: BCE(p_s, p_t) * |p_s - p_t|^beta (the authors: 1).
        _C.DISTILL.BCKD.CLS_BETA = 1.0
        # IoU-based localisation distillation: GIoU of decoded boxes, weighted by the largest
        # class-score difference (the authors' loss_score_kd, GIoU, loss_weight 4.0).
        _C.DISTILL.BCKD.LOC_WEIGHT = 4.0
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the authors do not decay).
        _C.DISTILL.BCKD.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.BCKD
        self.cls_weight = node.CLS_WEIGHT
        self.beta = node.CLS_BETA
        if self.beta < 0:
            raise ValueError(f"DISTILL.BCKD.CLS_BETA must be >= 0; got {self.beta}")
        self.loc_weight = node.LOC_WEIGHT
        distribution = "box_distribution" in student_capabilities(cfg)
        self.decode = DenseBoxDecoder(cfg, distribution)
        # GFL's normaliser is averaged over workers (as GFL's own losses), RetinaNet's is not
        self.over_workers = distribution
        self.requires = frozenset(
            {"student.dense", "teacher.dense", "student.anchors", "paired_anchors"}
            | ({"student.box_distribution", "teacher.box_distribution"} if distribution else set())
        )

    def forward(self, ctx) -> Dict[str, Tensor]:
        dense_s, dense_t = ctx.dense(STUDENT), ctx.dense(TEACHER)
        cls_s, cls_t = dense_s.concat(0), dense_t.concat(0)  # (N, R, C)
        if cls_s.shape != cls_t.shape:
            raise ValueError(f"BCKD pairs anchors one to one: student logits {tuple(cls_s.shape)}, "
                             f"teacher {tuple(cls_t.shape)}")
        anchors = ctx.anchors
        valid = anchors.labels >= 0  # (N, R): not ignored by the detector's assignment
        normaliser = positive_count(anchors, self.over_workers)
        decay = self.decay_factor(ctx)

        loss_cls = binary_kd_loss(cls_s[valid], cls_t[valid], self.beta).sum() / normaliser

        with torch.no_grad():
            weight = (cls_t.float().sigmoid() - cls_s.float().sigmoid()).abs().amax(dim=-1) * valid
            boxes_t = self.decode(dense_t.concat(1), anchors)
        boxes_s = self.decode(dense_s.concat(1), anchors)
        rows = weight > 0
        giou = giou_loss(boxes_s[rows], boxes_t[rows], reduction="none", eps=1e-7)
        loss_loc = (giou * weight[rows]).sum() / normaliser + boxes_s.sum() * 0.0
        return {
            self.loss_key("cls"): loss_cls * (self.cls_weight * decay),
            self.loss_key("loc"): loss_loc * (self.loc_weight * decay),
        }
