"""Per-step GT instance features and GK robust weights, computed once and shared by heads.

Every function takes the step's :class:`DistillContext` and memoises in ``ctx.cache``, so
GK, FitNet and KD with robust weights in one model pay for the instance features once.
"""
from typing import Dict

import torch
from detectron2.layers import cat
from torch import Tensor

from .instance_features import _cell_range, assign_box_strides, instance_features


def gt_instances_flat(ctx) -> Dict[str, Tensor]:
    """All GT boxes of the batch: ``boxes`` (M, 4), ``batch`` (M,), ``classes`` (M,),
    ``stride`` (M,) the FPN stride each box is assigned to (among the common strides)."""
    if "gt_flat" not in ctx.cache:
        boxes = cat([g.gt_boxes.tensor for g in ctx.gt_instances], dim=0)
        classes = cat([g.gt_classes for g in ctx.gt_instances], dim=0)
        batch = cat(
            [torch.full((len(g),), i, dtype=torch.long, device=boxes.device) for i, g in enumerate(ctx.gt_instances)]
        )
        ctx.cache["gt_flat"] = {
            "boxes": boxes,
            "batch": batch,
            "classes": classes,
            "stride": assign_box_strides(boxes, ctx.common_strides),
        }
    return ctx.cache["gt_flat"]


def gt_features(ctx, stride: int):
    """(f_s (M, D_s) with gradients, f_t (M, D_t)) of every GT box at ``stride``."""
    key = f"gt_feats_{stride}"
    if key not in ctx.cache:
        gt = gt_instances_flat(ctx)
        f_s = instance_features(ctx.student_features[stride], gt["boxes"], gt["batch"], stride)
        f_t = instance_features(ctx.teacher_features[stride], gt["boxes"], gt["batch"], stride)
        ctx.cache[key] = (f_s, f_t)
    return ctx.cache[key]


def gt_robust_weights(ctx, stride: int) -> Tensor:
    """(M,) robust weight of every GT box from its features at ``stride`` (1 without a bank)."""
    key = f"gt_robust_{stride}"
    if key not in ctx.cache:
        gt = gt_instances_flat(ctx)
        bank = ctx.prototype_bank
        if bank is None or not bank.is_built or stride not in bank.strides:
            w = torch.ones(len(gt["classes"]), device=ctx.device)
        else:
            f_s, f_t = gt_features(ctx, stride)
            w = bank.robust_weights(stride, gt["classes"], f_s, f_t)
        ctx.cache[key] = w
    return ctx.cache[key]


def assigned_robust_weights(ctx) -> Tensor:
    """(M,) robust weight of every GT box at the stride it is assigned to."""
    if "gt_robust_assigned" not in ctx.cache:
        gt = gt_instances_flat(ctx)
        w = torch.ones(len(gt["classes"]), device=ctx.device)
        for s in ctx.common_strides:
            here = gt["stride"] == s
            if here.any():
                w[here] = gt_robust_weights(ctx, s)[here]
        ctx.cache["gt_robust_assigned"] = w
    return ctx.cache["gt_robust_assigned"]


def robust_weight_map(ctx, stride: int, size, background: float = 0.0) -> Tensor:
    """(N, H, W) map: the cells each GT box assigned to ``stride`` covers hold its robust
    weight (the largest where boxes overlap), all other cells ``background``.

    With ``background=0`` this is GK's foreground mask M (METHODS.md 1.5); its cells that no
    box covers are exactly ``map == 0`` when every weight is positive, so callers that need
    the background set should use :func:`coverage_map` instead of testing for zeros.
    """
    weights, covered = _weighted_coverage(ctx, stride, size)
    return torch.where(covered, weights, torch.full_like(weights, background))


def coverage_map(ctx, stride: int, size) -> Tensor:
    """(N, H, W) bool: cells covered by any GT box assigned to ``stride``."""
    return _weighted_coverage(ctx, stride, size)[1]


def _weighted_coverage(ctx, stride: int, size):
    key = f"coverage_{stride}_{tuple(size)}"
    if key not in ctx.cache:
        h, w = int(size[0]), int(size[1])
        gt = gt_instances_flat(ctx)
        n = len(ctx.gt_instances)
        here = gt["stride"] == stride
        boxes, batch = gt["boxes"][here], gt["batch"][here]
        weights = assigned_robust_weights(ctx)[here]
        x0, x1 = _cell_range(boxes[:, 0], boxes[:, 2], stride, w)
        y0, y1 = _cell_range(boxes[:, 1], boxes[:, 3], stride, h)
        ys = torch.arange(h, device=boxes.device)
        xs = torch.arange(w, device=boxes.device)
        # (M, H, W) coverage of each box; M is the number of GT boxes at this stride (small)
        inside = ((ys[None, :] >= y0[:, None]) & (ys[None, :] <= y1[:, None]))[:, :, None] & (
            (xs[None, :] >= x0[:, None]) & (xs[None, :] <= x1[:, None])
        )[:, None, :]
        per_box = inside.float() * weights[:, None, None]
        wmap = torch.zeros(n, h, w, device=boxes.device)
        count = torch.zeros(n, h, w, device=boxes.device)
        wmap.index_reduce_(0, batch, per_box, "amax", include_self=True)
        count.index_add_(0, batch, inside.float())
        ctx.cache[key] = (wmap, count > 0)
    return ctx.cache[key]


def roi_robust_weights(ctx) -> Tensor:
    """(R,) robust weight of each sampled RoI (R-CNN): a foreground RoI's weight comes from its
    own pooled features against its matched GT class' prototypes; background RoIs get 1."""
    if "roi_robust" not in ctx.cache:
        props = ctx.proposals
        boxes = cat([p.proposal_boxes.tensor for p in props], dim=0)
        classes = cat([p.gt_classes for p in props], dim=0)
        batch = cat(
            [torch.full((len(p),), i, dtype=torch.long, device=boxes.device) for i, p in enumerate(props)]
        )
        w = torch.ones(len(boxes), device=boxes.device)
        bank = ctx.prototype_bank
        fg = classes != ctx.num_classes
        if bank is not None and bank.is_built and fg.any():
            # assign among all common strides (a consecutive set); only the bank's are used
            strides = assign_box_strides(boxes, ctx.common_strides)
            for s in bank.strides:
                sel = fg & (strides == s)
                if sel.any():
                    f_s = instance_features(ctx.student_features[s], boxes[sel], batch[sel], s)
                    f_t = instance_features(ctx.teacher_features[s], boxes[sel], batch[sel], s)
                    w[sel] = bank.robust_weights(s, classes[sel], f_s, f_t)
        ctx.cache["roi_robust"] = w
    return ctx.cache["roi_robust"]


def anchor_robust_weights(ctx) -> Tensor:
    """(N, R) robust weight of each anchor's matched GT (RetinaNet); 1 for other anchors."""
    if "anchor_robust" not in ctx.cache:
        index = ctx.anchor_gt_index  # (N, R), -1 when not foreground
        w_gt = assigned_robust_weights(ctx)
        sizes = [len(g) for g in ctx.gt_instances]
        offsets = torch.tensor([0] + sizes[:-1], device=index.device).cumsum(0)
        flat = (index + offsets[:, None]).clamp(min=0)
        w = w_gt[flat] if len(w_gt) else torch.ones_like(index, dtype=torch.float32)
        ctx.cache["anchor_robust"] = torch.where(index >= 0, w, torch.ones_like(w))
    return ctx.cache["anchor_robust"]


def class_logit_row_weights(ctx) -> Tensor:
    """Robust weights aligned with ``heads.functional.paired_class_logits``' rows."""
    if ctx.proposals is not None:
        return roi_robust_weights(ctx)
    return anchor_robust_weights(ctx)[ctx.positive_anchors]
