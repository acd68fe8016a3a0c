"""GFL (Generalized Focal Loss, Li et al., NeurIPS 2020) as a detectron2 meta-architecture.

The LD paper's main setting (docs/METHODS.md section 3) is a detector whose box branch
predicts, per box edge, a discrete distribution over ``{0, ..., n}`` (``n = REG_MAX``): the
edge's distance from the anchor centre, in units of the level's stride, is its expectation
``sum_k k * softmax(z)_k``. GFL trains it with

- **ATSS** assignment (:func:`atss_assign`): one square anchor per location, of side
  ``OCTAVE_BASE_SCALE * stride``;
- **quality focal loss** on C sigmoid class logits, whose target at a positive anchor is the
  IoU of its decoded box with its GT box (:func:`quality_focal_loss`), averaged over the
  positives;
- **distribution focal loss** (:func:`distribution_focal_loss`) and **GIoU** on the positives,
  each weighted by the anchor's largest predicted class score (detached) and averaged over
  the sum of those weights, as GFL's released code (mmdetection's ``GFLHead``) does.

Inference follows detectron2's RetinaNet (``DenseDetector.forward_inference``): per level the
top-k (anchor, class) pairs above a score threshold, decoded, per-class NMS, then
``detector_postprocess``, so detectron2's evaluators work unchanged.

The model reads ``cfg.MODEL.GFL`` (:func:`d2kd.config.add_gfl_config`, also added by
``add_distill_config``). A config that names ``GFL`` loads in stock detectron2 once ``d2kd`` is
imported (it registers the meta-architecture) and ``add_gfl_config(cfg)`` has been called.
"""
import math
from typing import List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import CycleBatchNormList, ShapeSpec, batched_nms, cat, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import Backbone, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss
from torch import Tensor, nn

from ..structures.atss import atss_thresholds, box_centres
from .kinds import DENSE, KINDS, DetectorKind, TowerSpec

__all__ = [
    "GFL", "GFLHead", "GFL_KIND", "atss_assign", "atss_thresholds", "distribution_to_distance",
    "distance_to_boxes", "boxes_to_distance", "distribution_focal_loss", "quality_focal_loss",
]


# ---- box distributions ----
def distribution_to_distance(logits: Tensor, reg_max: int) -> Tensor:
    """Expected edge distances of per-edge distributions.

    Args:
        logits (Tensor): (..., 4 * (reg_max + 1)), edges in order (left, top, right, bottom),
            each edge's ``reg_max + 1`` bins contiguous.
    Returns:
        Tensor: (..., 4), ``sum_k k * softmax(z)_k`` per edge, in bins (stride units).
    """
    bins = reg_max + 1
    if logits.shape[-1] != 4 * bins:
        raise ValueError(f"expected 4 * (reg_max + 1) = {4 * bins} box channels, got {logits.shape[-1]}")
    prob = F.softmax(logits.reshape(*logits.shape[:-1], 4, bins).float(), dim=-1)
    return prob @ torch.arange(bins, dtype=prob.dtype, device=prob.device)


def distance_to_boxes(centres: Tensor, distances: Tensor) -> Tensor:
    """(R, 2) points and (R, 4) distances (left, top, right, bottom) -> (R, 4) XYXY boxes."""
    return torch.cat([centres - distances[..., :2], centres + distances[..., 2:]], dim=-1)


def boxes_to_distance(centres: Tensor, boxes: Tensor, max_distance: float = None, eps: float = 0.1) -> Tensor:
    """(R, 2) points and (R, 4) XYXY boxes -> (R, 4) distances to the edges, clamped to
    ``[0, max_distance - eps]`` when ``max_distance`` is given (the authors' ``bbox2distance``,
    eps 0.1), so that the DFL target always has a right-hand bin."""
    d = torch.cat([centres - boxes[..., :2], boxes[..., 2:] - centres], dim=-1)
    if max_distance is not None:
        d = d.clamp(min=0, max=max_distance - eps)
    return d


class DistanceBoxTransform:
    """Decodes distances instead of deltas, with the interface DenseDetector's decoding uses.

    ``apply_deltas(distances, anchors)``: (R, 4) pixel distances (left, top, right, bottom)
    from the centres of (R, 4) XYXY anchors -> (R, 4) XYXY boxes.
    """

    def apply_deltas(self, distances: Tensor, anchors: Tensor) -> Tensor:
        return distance_to_boxes(box_centres(anchors), distances.to(anchors.dtype))


# ---- losses ----
def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL: cross-entropy on the two bins around a continuous target, weighted linearly.

    ``(k + 1 - y) * CE(z, k) + (y - k) * CE(z, k + 1)`` with ``k = floor(y)``; for an integer
    target ``y = k`` it is ``-log softmax(z)_k``.

    Args:
        logits (Tensor): (M, n + 1) one edge's bins per row.
        target (Tensor): (M,) distances in ``[0, n]``.
    Returns:
        Tensor: (M,).
    """
    n = logits.shape[-1] - 1
    target = target.float()
    left = target.floor().long().clamp(0, n)
    right = (left + 1).clamp(max=n)
    w_left = left.float() + 1 - target
    w_right = target - left.float()
    logits = logits.float()
    return (F.cross_entropy(logits, left, reduction="none") * w_left
            + F.cross_entropy(logits, right, reduction="none") * w_right)


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """QFL: ``BCE(sigmoid(z), y) * |y - sigmoid(z)|^beta`` per (anchor, class), where ``y`` is
    the anchor's quality (IoU) target at its GT class and 0 elsewhere (negatives: ``p^beta``).

    Args:
        logits (Tensor): (M, C) class logits.
        labels (Tensor): (M,) class of each anchor, C (or -1) where it has none.
        quality (Tensor): (M,) target at the labelled class.
    Returns:
        Tensor: (M, C), not reduced.
    """
    logits = logits.float()
    num_classes = logits.shape[-1]
    target = torch.zeros_like(logits)
    pos = (labels >= 0) & (labels < num_classes)
    rows = pos.nonzero().squeeze(1)
    target[rows, labels[rows]] = quality[rows].float()
    prob = logits.sigmoid()
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * (target - prob).abs().pow(beta)


# ---- ATSS ----
@torch.no_grad()
def atss_assign(level_anchors: List[Tensor], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """ATSS (Zhang et al., CVPR 2020), as GFL uses it.

    Per GT box: the ``topk`` anchors per level closest to it by centre are its candidates;
    those whose IoU with it is at least mean + std of the candidates' IoUs and whose centre
    lies inside it (by more than 0.01 px) are positive for it. An anchor positive for several
    GT boxes takes the one with the highest IoU.

    Args:
        level_anchors (list[Tensor]): per level (R_l, 4) XYXY anchors.
        gt_boxes (Tensor): (G, 4) XYXY.
    Returns:
        Tensor: (R,) int64 index of the assigned GT box, -1 for background.
    """
    anchors = torch.cat(level_anchors, dim=0)
    num_anchors, num_gt = len(anchors), len(gt_boxes)
    if num_gt == 0:
        return torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    iou = pairwise_iou(Boxes(anchors), Boxes(gt_boxes))  # (R, G)
    cand, thr = atss_thresholds(level_anchors, gt_boxes, iou, topk)
    cand_iou = iou.gather(0, cand)
    centres = box_centres(anchors)[cand]  # (K, G, 2)
    margins = torch.stack([
        centres[..., 0] - gt_boxes[:, 0], centres[..., 1] - gt_boxes[:, 1],
        gt_boxes[:, 2] - centres[..., 0], gt_boxes[:, 3] - centres[..., 1],
    ], dim=-1)
    is_pos = (cand_iou >= thr[None, :]) & (margins.min(dim=-1).values > 0.01)
    positive = torch.zeros_like(iou, dtype=torch.bool).scatter_(0, cand, is_pos)  # (R, G)
    best = torch.where(positive, iou, torch.full_like(iou, -1.0)).argmax(dim=1)
    return torch.where(positive.any(dim=1), best, torch.full_like(best, -1))


def _mean_over_workers(x: Tensor) -> Tensor:
    if comm.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / comm.get_world_size()


# ---- the head ----
class GFLHead(nn.Module):
    """Shared class and box towers (3x3 convs + norm + ReLU) over every level, then a C-channel
    class conv and a ``4 * (reg_max + 1)``-channel box conv scaled by a learnable scalar per
    level (GFL's ``Scale``). Returns ``(class logits, box logits)``, each a list over levels
    of (N, K, H, W)."""

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes: int, reg_max: int,
                 conv_dims: List[int], norm="GN", prior_prob: float = 0.01):
        super().__init__()
        if len({s.channels for s in input_shape}) != 1:
            channels = [s.channels for s in input_shape]
            raise ValueError(f"GFL's head is shared across levels; its inputs have channels {channels}")
        self._num_features = len(input_shape)
        if norm in ("BN", "SyncBN"):
            # one BN per level, as detectron2's RetinaNetHead does
            bn_class = nn.BatchNorm2d if norm == "BN" else nn.SyncBatchNorm

            def norm(c):  # noqa: F811
                return CycleBatchNormList(length=self._num_features, bn_class=bn_class, num_features=c)

        cls_layers, box_layers = [], []
        for c_in, c_out in zip([input_shape[0].channels] + list(conv_dims), conv_dims):
            for layers in (cls_layers, box_layers):
                layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1))
                if norm:
                    layers.append(get_norm(norm, c_out))
                layers.append(nn.ReLU())
        self.cls_subnet = nn.Sequential(*cls_layers)
        self.bbox_subnet = nn.Sequential(*box_layers)
        channels = conv_dims[-1] if conv_dims else input_shape[0].channels
        self.cls_score = nn.Conv2d(channels, num_classes, kernel_size=3, stride=1, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4 * (reg_max + 1), kernel_size=3, stride=1, padding=1)
        self.scales = nn.Parameter(torch.ones(self._num_features))
        for module in [self.cls_subnet, self.bbox_subnet, self.cls_score, self.bbox_pred]:
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    nn.init.normal_(layer.weight, mean=0, std=0.01)
                    nn.init.constant_(layer.bias, 0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        node = cfg.MODEL.GFL
        return {
            "input_shape": input_shape,
            "num_classes": node.NUM_CLASSES,
            "reg_max": node.REG_MAX,
            "conv_dims": [input_shape[0].channels] * node.NUM_CONVS,
            "norm": node.NORM,
            "prior_prob": node.PRIOR_PROB,
        }

    def forward(self, features: List[Tensor]):
        if len(features) != self._num_features:
            raise ValueError(f"GFLHead was built for {self._num_features} levels, got {len(features)}")
        logits, boxes = [], []
        for i, x in enumerate(features):
            logits.append(self.cls_score(self.cls_subnet(x)))
            boxes.append(self.bbox_pred(self.bbox_subnet(x)) * self.scales[i])
        return logits, boxes


# ---- the meta-architecture ----
@META_ARCH_REGISTRY.register()
class GFL(DenseDetector):
    """GFL: ATSS assignment, quality focal loss, distribution box branch (see the module doc).

    Training losses: ``loss_qfl``, ``loss_dfl``, ``loss_giou`` (already weighted).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: List[str],
        anchor_generator: nn.Module,
        num_classes: int,
        reg_max: int = 16,
        atss_topk: int = 9,
        qfl_beta: float = 2.0,
        qfl_weight: float = 1.0,
        dfl_weight: float = 0.25,
        giou_weight: float = 2.0,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean,
        pixel_std,
        vis_period: int = 0,
        input_format: str = "BGR",
    ):
        """
        Args:
            backbone, head, head_in_features, pixel_mean, pixel_std: see
                :class:`DenseDetector`; ``head`` returns (class logits, box logits) per level.
            anchor_generator: one anchor per location (``num_cell_anchors`` all 1).
            num_classes (int): C.
            reg_max (int): n, the largest bin of each edge distribution.
            atss_topk (int): ATSS candidates per level and GT box.
            qfl_beta, qfl_weight, dfl_weight, giou_weight: the loss parameters.
            test_*, max_detections_per_image: inference, as RetinaNet's.
        """
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        if any(a != 1 for a in anchor_generator.num_cell_anchors):
            raise ValueError(
                f"GFL uses one anchor per location; the anchor generator has "
                f"{list(anchor_generator.num_cell_anchors)} per level"
            )
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator
        self.box2box_transform = DistanceBoxTransform()
        self.strides = [backbone.output_shape()[f].stride for f in self.head_in_features]
        self.reg_max = reg_max
        self.atss_topk = atss_topk
        self.qfl_beta = qfl_beta
        self.qfl_weight = qfl_weight
        self.dfl_weight = dfl_weight
        self.giou_weight = giou_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.vis_period = vis_period
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.GFL
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in node.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.GFL.IN_FEATURES names {missing}, which the backbone does not output "
                f"(it outputs {sorted(shapes)}); GFL reads p3-p7, e.g. from "
                "build_retinanet_resnet_fpn_backbone"
            )
        feature_shapes = [shapes[f] for f in node.IN_FEATURES]
        strides = [s.stride for s in feature_shapes]
        anchor_generator = DefaultAnchorGenerator(
            sizes=[[node.OCTAVE_BASE_SCALE * s] for s in strides],
            aspect_ratios=[[1.0]],
            strides=strides,
            offset=cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        )
        return {
            "backbone": backbone,
            "head": GFLHead(cfg, feature_shapes),
            "head_in_features": list(node.IN_FEATURES),
            "anchor_generator": anchor_generator,
            "num_classes": node.NUM_CLASSES,
            "reg_max": node.REG_MAX,
            "atss_topk": node.TOPK,
            "qfl_beta": node.QFL_BETA,
            "qfl_weight": node.QFL_WEIGHT,
            "dfl_weight": node.DFL_WEIGHT,
            "giou_weight": node.GIOU_WEIGHT,
            "test_score_thresh": node.SCORE_THRESH_TEST,
            "test_topk_candidates": node.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": node.NMS_THRESH_TEST,
            "max_detections_per_image": node.MAX_DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "vis_period": cfg.VIS_PERIOD,
            "input_format": cfg.INPUT.FORMAT,
        }

    # ---- training ----
    def forward_training(self, images, features, predictions, gt_instances):
        cls_logits, box_logits = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4 * (self.reg_max + 1)]
        )
        anchors = self.anchor_generator(features)
        gt_labels, matched_gt = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, cls_logits, box_logits, gt_labels, matched_gt, gt_instances)

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]) -> Tuple[List[Tensor], List[Tensor]]:
        """ATSS labels of every anchor: GFL's documented hook point (DistillGFL records both
        results for the distillation heads).

        Args:
            anchors (list[Boxes]): per level, the (H*W) anchors.
            gt_instances (list[Instances]): per image, ``gt_boxes`` and ``gt_classes``.
        Returns:
            list[Tensor], list[Tensor]: per image, (R,) labels (the assigned GT box's class,
            ``num_classes`` for background; GFL ignores no anchor) and (R,) the assigned GT
            box's index in its image, -1 for background.
        """
        level = [a.tensor for a in anchors]
        labels, matched = [], []
        for gts in gt_instances:
            index = atss_assign(level, gts.gt_boxes.tensor, self.atss_topk)
            label = torch.full_like(index, self.num_classes)
            pos = index >= 0
            label[pos] = gts.gt_classes[index[pos]]
            labels.append(label)
            matched.append(index)
        return labels, matched

    def losses(self, anchors: List[Boxes], cls_logits: List[Tensor], box_logits: List[Tensor],
               gt_labels: List[Tensor], matched_gt: List[Tensor], gt_instances: List[Instances]):
        """GFL's losses.

        - ``loss_qfl``: QFL summed over anchors and classes, divided by the number of
          positives (averaged over workers, at least 1);
        - ``loss_giou``: GIoU of the decoded boxes of the positives, and ``loss_dfl``: DFL per
          edge (mean over the 4 edges), each weighted per positive by its largest class score
          (sigmoid, detached) and divided by the sum of those weights (averaged over workers),
          as mmdetection's GFLHead (avg_factor = sum of weight_targets).
        """
        num_images = len(gt_labels)
        labels = torch.stack(gt_labels)  # (N, R)
        assigned = torch.stack(matched_gt)  # (N, R)
        cls = cat(cls_logits, dim=1).float()  # (N, R, C)
        box = cat(box_logits, dim=1).float()  # (N, R, 4(n+1))
        all_anchors = Boxes.cat(anchors).tensor
        strides = cat([torch.full((len(a),), float(s), device=all_anchors.device)
                       for a, s in zip(anchors, self.strides)])
        pos = labels != self.num_classes
        num_pos = pos.sum()
        get_event_storage().put_scalar("num_pos_anchors", num_pos.item() / num_images)
        normalizer = _mean_over_workers(num_pos.float()).clamp(min=1.0)

        n_idx, r_idx = pos.nonzero(as_tuple=True)
        offsets = torch.tensor([0] + [len(g) for g in gt_instances[:-1]], device=labels.device).cumsum(0)
        gt_boxes = cat([g.gt_boxes.tensor for g in gt_instances], dim=0)
        stride = strides[r_idx][:, None]
        # in stride units, as GFL (IoU and GIoU do not depend on the unit; DFL does)
        centres = box_centres(all_anchors[r_idx]) / stride
        target = gt_boxes[offsets[n_idx] + assigned[n_idx, r_idx]].float() / stride
        pos_box = box[n_idx, r_idx]  # (P, 4(n+1))
        pred = distance_to_boxes(centres, distribution_to_distance(pos_box, self.reg_max))

        quality = torch.zeros_like(labels, dtype=torch.float32)
        if len(n_idx):
            quality[n_idx, r_idx] = matched_pairwise_iou(Boxes(pred.detach()), Boxes(target)).clamp(min=0)
        loss_qfl = quality_focal_loss(
            cls.reshape(-1, self.num_classes), labels.reshape(-1), quality.reshape(-1), self.qfl_beta
        ).sum() / normalizer

        weight = cls.detach().sigmoid().max(dim=-1).values[n_idx, r_idx]  # (P,)
        weight_sum = _mean_over_workers(weight.sum()).clamp(min=1e-6)
        loss_giou = (giou_loss(pred, target, reduction="none") * weight).sum() / weight_sum
        target_distance = boxes_to_distance(centres, target, self.reg_max)
        dfl = distribution_focal_loss(pos_box.reshape(-1, self.reg_max + 1), target_distance.reshape(-1))
        loss_dfl = (dfl.reshape(-1, 4).mean(dim=1) * weight).sum() / weight_sum
        return {
            "loss_qfl": loss_qfl * self.qfl_weight,
            "loss_dfl": loss_dfl * self.dfl_weight,
            "loss_giou": loss_giou * self.giou_weight,
        }

    # ---- inference ----
    def forward_inference(self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]):
        cls_logits, box_logits = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4 * (self.reg_max + 1)]
        )
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for i, image_size in enumerate(images.image_sizes):
            scores = [x[i].sigmoid() for x in cls_logits]
            distances = [distribution_to_distance(x[i], self.reg_max) * s for x, s in zip(box_logits, self.strides)]
            results.append(self.inference_single_image(anchors, scores, distances, image_size))
        return results

    def inference_single_image(self, anchors: List[Boxes], scores: List[Tensor], distances: List[Tensor],
                               image_size: Tuple[int, int]) -> Instances:
        """RetinaNet's single-image inference with pixel distances in place of deltas:
        per level the top-k (anchor, class) pairs above the score threshold, boxes decoded
        from the anchor centres, per-class NMS, at most ``max_detections_per_image``."""
        pred = self._decode_multi_level_predictions(
            anchors, scores, distances, self.test_score_thresh, self.test_topk_candidates, image_size
        )
        keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh)
        return pred[keep[: self.max_detections_per_image]]


GFL_KIND = DetectorKind(
    name="dense",
    capabilities=DENSE.capabilities | {"box_distribution"},
    recorded=dict(DENSE.recorded),
    num_classes=lambda model: model.num_classes,
    anchor_generator=lambda model: model.anchor_generator,
    describe="a GFL detector (dense, its box branch a distribution per box edge)",
    num_classes_key="MODEL.GFL.NUM_CLASSES",
    model_class=GFL,
    # GFLHead's towers as RetinaNet's; the box conv's output is multiplied by its level's scale
    towers=TowerSpec((("cls_subnet", "cls_score", ""), ("bbox_subnet", "bbox_pred", "scales"))),
)
# kind_of(): a GFL is a DenseDetector too, so its own kind must be tried before DENSE.
KINDS.insert(KINDS.index(DENSE), GFL_KIND)
