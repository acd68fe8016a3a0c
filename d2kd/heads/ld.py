"""Localization Distillation (Zheng et al., CVPR 2022; docs/METHODS.md section 3) for GFL."""
from typing import Dict, List

import torch
from detectron2.config import CfgNode as CN
from detectron2.structures import Boxes, pairwise_iou
from torch import Tensor

from ..structures import STUDENT, TEACHER
from ..structures.atss import atss_thresholds, box_centres
from .base import DistillHead
from .functional import kl_per_row
from .registry import DISTILL_HEAD_REGISTRY

# The authors' normalisation of the VLR term (LDHead: avg_factor 16 over anchor x edge rows).
VLR_AVG_FACTOR = 16.0


def edge_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """LD per edge: ``T^2 * mean_k p_t,k log(p_t,k / p_s,k)``, ``p = softmax(z / T)`` over bins.

    Args:
        student, teacher (Tensor): (M, 4 * (n + 1)) per-edge distribution logits.
    Returns:
        Tensor: (M, 4), fp32.
    """
    bins = student.shape[-1] // 4
    kl = kl_per_row(student.reshape(-1, bins), teacher.reshape(-1, bins), temperature) / bins
    return kl.reshape(-1, 4)


def pairwise_diou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6, iou: Tensor = None) -> Tensor:
    """Distance-IoU: ``IoU - rho^2 / c^2`` (rho: distance of the centres, c: diagonal of the
    smallest enclosing box) of every (R, 4) box with every (G, 4) box -> (R, G)."""
    if iou is None:  # callers that hold the (R, G) IoUs already pass them
        iou = pairwise_iou(Boxes(boxes1), Boxes(boxes2))
    rho2 = ((box_centres(boxes1)[:, None] - box_centres(boxes2)[None]) ** 2).sum(-1)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    diag2 = ((rb - lt).clamp(min=0) ** 2).sum(-1).clamp(min=eps)
    return iou - rho2 / diag2


def vlr_weights(level_anchors: List[Tensor], gt_boxes: Tensor, iou: Tensor = None, topk: int = 9,
                lower: float = 0.25) -> Tensor:
    """The valuable localisation region of one image and its weights.

    An anchor is in GT box g's VLR when ``lower * t_g <= DIoU(anchor, g) < t_g`` (t_g: the
    ATSS threshold of g); its weight is its largest IoU with a GT box whose VLR it is in, 0
    outside every VLR. As the authors' code: any anchor of any level qualifies (positives
    too), no centre-inside-the-box condition.

    Args:
        level_anchors (list[Tensor]): per level (R_l, 4) XYXY anchors, in concatenation order.
        gt_boxes (Tensor): (G, 4) XYXY.
        iou (Tensor or None): (R, G) IoUs, computed when None.
    Returns:
        Tensor: (R,) weights, > 0 exactly on the VLR.
    """
    anchors = torch.cat(level_anchors, dim=0)
    if len(gt_boxes) == 0:
        return anchors.new_zeros(len(anchors))
    if iou is None:
        iou = pairwise_iou(Boxes(anchors), Boxes(gt_boxes))
    _, thr = atss_thresholds(level_anchors, gt_boxes, iou, topk)
    diou = pairwise_diou(anchors, gt_boxes, iou=iou)
    band = (diou >= lower * thr[None, :]) & (diou < thr[None, :])
    return torch.where(band, iou, torch.zeros_like(iou)).max(dim=1).values


@DISTILL_HEAD_REGISTRY.register()
class LDHead(DistillHead):
    """LD for GFL students and teachers (both box branches are per-edge distributions).

    - ``loss_distill_ld`` (``WEIGHT``, 0.25): :func:`edge_kl` at T = 10 on the main region,
      the student's positive (ATSS) anchors, each weighted by the student's largest class
      score (sigmoid, detached); summed over the anchors of the batch (mean over the 4
      edges), as the authors (LDHead: avg_factor 4, no division by the number of anchors).
    - ``loss_distill_ld_vlr`` (``VLR_WEIGHT``, 0.25): the same KL on the valuable
      localisation region (:func:`vlr_weights`), weighted by the anchor's IoU; summed over the
      anchors and edges and divided by 16 (the authors' avg_factor).
    - ``loss_distill_ld_kd`` (``KD_WEIGHT``, 10): class KD on the main region, ``T^2 KL`` of
      the softmax over the C class logits (T = 2) as a mean over the classes; averaged over the
      positives of each level and summed over the levels, as the authors.

    Requires both models to be of a distribution kind (``box_distribution``) with the same
    anchors; any other pair is refused when the model is built.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.LD``, this head's keys and their defaults."""
        _C = cfg
        # Localization Distillation (docs/METHODS.md section 3) for GFL students and teachers: edge-
        # distribution KL on the main region and the valuable localisation region, class KD.
        _C.DISTILL.LD = CN()
        # Main region (the student's positive anchors), weighted by the student's max class score.
        _C.DISTILL.LD.WEIGHT = 0.25
        # Valuable localisation region: 0.25 t_g <= DIoU(anchor, g) < t_g, weighted by the IoU.
        _C.DISTILL.LD.VLR_WEIGHT = 0.25
        _C.DISTILL.LD.VLR_LOWER = 0.25
        # Temperature of the edge-distribution KL.
        _C.DISTILL.LD.TEMPERATURE = 10.0
        # Class KD (softmax over classes) on the main region's anchors; 0 turns it off.
        _C.DISTILL.LD.KD_WEIGHT = 10.0
        _C.DISTILL.LD.KD_TEMPERATURE = 2.0
        # ATSS candidates per level for t_g (mean + std of their IoUs).
        _C.DISTILL.LD.TOPK = 9
        _C.DISTILL.LD.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.LD
        self.weight = node.WEIGHT
        self.vlr_weight = node.VLR_WEIGHT
        self.vlr_lower = node.VLR_LOWER
        self.kd_weight = node.KD_WEIGHT
        self.temperature = node.TEMPERATURE
        self.kd_temperature = node.KD_TEMPERATURE
        self.topk = node.TOPK
        self.requires = frozenset({
            "student.box_distribution", "teacher.box_distribution", "student.dense", "teacher.dense",
            "student.anchors", "paired_anchors",
        })

    def forward(self, ctx) -> Dict[str, Tensor]:
        dense_s, dense_t = ctx.dense(STUDENT), ctx.dense(TEACHER)
        box_s, box_t = dense_s.concat(1), dense_t.concat(1)  # (N, R, 4(n+1))
        if box_s.shape != box_t.shape:
            raise ValueError(
                f"LD compares edge distributions bin by bin, but the student's box branch has "
                f"{box_s.shape[-1]} channels per anchor and the teacher's {box_t.shape[-1]}; give "
                "both the same MODEL.GFL.REG_MAX"
            )
        cls_s, cls_t = dense_s.concat(0), dense_t.concat(0)
        anchors = ctx.anchors
        pos = anchors.positive
        decay = self.decay_factor(ctx)

        w_main = cls_s.detach().float().sigmoid().max(dim=-1).values[pos]
        loss_main = (edge_kl(box_s[pos], box_t[pos], self.temperature).mean(dim=-1) * w_main).sum()

        w_vlr = self._vlr(ctx)
        vlr = w_vlr > 0
        loss_vlr = (edge_kl(box_s[vlr], box_t[vlr], self.temperature).sum(dim=-1) * w_vlr[vlr]).sum() / VLR_AVG_FACTOR

        losses = {
            self.loss_key(): loss_main * (self.weight * decay),
            self.loss_key("vlr"): loss_vlr * (self.vlr_weight * decay),
        }
        if self.kd_weight > 0:
            losses[self.loss_key("kd")] = self._class_kd(cls_s, cls_t, anchors) * (self.kd_weight * decay)
        return losses

    def _vlr(self, ctx) -> Tensor:
        """(N, R) VLR weights of the batch."""
        anchors = ctx.anchors
        level_anchors = [anchors.anchors[s].tensor for s in anchors.strides]
        with torch.no_grad():
            return torch.stack([
                vlr_weights(level_anchors, gts.gt_boxes.tensor, iou.t(), self.topk, self.vlr_lower)
                for gts, iou in zip(ctx.gt_instances, anchors.ious)
            ])

    def _class_kd(self, cls_s: Tensor, cls_t: Tensor, anchors) -> Tensor:
        pos = anchors.per_level(anchors.positive)
        student, teacher = anchors.per_level(cls_s), anchors.per_level(cls_t)
        total = cls_s.sum() * 0.0
        for s in anchors.strides:
            rows = pos[s]
            if rows.any():
                kl = kl_per_row(student[s][rows], teacher[s][rows], self.kd_temperature) / cls_s.shape[-1]
                total = total + kl.mean()
        return total
