"""ATSS's adaptive IoU threshold (Zhang et al., CVPR 2020), shared by the GFL detector's
assignment (``d2kd.modeling.gfl``) and LD's valuable localisation region (``d2kd.heads.ld``)."""
from typing import List, Tuple

import torch
from torch import Tensor


def box_centres(boxes: Tensor) -> Tensor:
    """(..., 4) XYXY -> (..., 2) centres."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def atss_candidates(level_anchors: List[Tensor], gt_boxes: Tensor, topk: int) -> Tensor:
    """(K, G) indices (into the concatenated anchors) of the ``topk`` anchors per level whose
    centres are closest to each GT box's centre."""
    gt_centres = box_centres(gt_boxes)
    out, start = [], 0
    for anchors in level_anchors:
        d = ((box_centres(anchors)[:, None, :] - gt_centres[None, :, :]) ** 2).sum(-1).sqrt()
        out.append(d.topk(min(topk, len(anchors)), dim=0, largest=False).indices + start)
        start += len(anchors)
    return torch.cat(out, dim=0)


def atss_thresholds(level_anchors: List[Tensor], gt_boxes: Tensor, iou: Tensor, topk: int = 9) -> Tuple[Tensor, Tensor]:
    """ATSS's adaptive IoU threshold per GT box.

    Args:
        level_anchors (list[Tensor]): per level (R_l, 4) XYXY anchors, in concatenation order.
        gt_boxes (Tensor): (G, 4) XYXY.
        iou (Tensor): (R, G) IoU of every anchor with every GT box.
        topk (int): candidates per level.
    Returns:
        (Tensor, Tensor): candidates (K, G) (anchor indices) and thresholds (G,): the mean
        plus the (unbiased) standard deviation of the candidates' IoUs.
    """
    cand = atss_candidates(level_anchors, gt_boxes, topk)
    cand_iou = iou.gather(0, cand)
    thr = cand_iou.mean(0)
    if len(cand) > 1:
        thr = thr + cand_iou.std(0)
    return cand, thr
