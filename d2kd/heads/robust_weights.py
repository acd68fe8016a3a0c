"""GK's instances of a step and their robust weights (GK paper Sec. 3.3, Eq. 7-8), computed
once per step and shared by every head that uses them (GK, and FitNet / KD with
ROBUST_WEIGHTS, GK paper Table 4).

An *instance* is a box with a class: a GT box, or (two-stage, as the authors' Faster R-CNN
code does with ``proposal_replace_gt``) a positive sampled RoI with its matched GT's class.
Each instance is assigned one FPN level by the authors' rule
(:func:`d2kd.structures.assign_box_levels`, an index into the student's level list); its
robust weight is ``1 - |max_k cos(f_s, P_s[c]) - max_k cos(f_t, P_t[c])|`` at that level,
clamped to [0, 1] and detached, and 1 where there are no prototypes.
"""
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch
from fvcore.nn import smooth_l1_loss
from torch import Tensor

from ..prototypes.instance_features import instance_features
from ..structures import assign_box_levels

INSTANCE_SOURCES = ("gt", "positive_rois")


@dataclass
class StepInstances:
    """The instances of one step.

    Attributes:
        boxes (Tensor): (M, 4) XYXY in input pixels.
        classes (Tensor): (M,) class of each instance.
        batch (Tensor): (M,) image index.
        stride (Tensor): (M,) the FPN stride each instance is assigned to.
        weight (Tensor): (M,) robust weight (1 without prototypes), detached.
        features (dict[int, (Tensor, Tensor, Tensor)]): stride -> (index (m,) into the M
            instances assigned there, f_s (m, D_s) with gradients, f_t (m, D_t)), for the
            strides of the prototype bank once it is built.
    """

    boxes: Tensor
    classes: Tensor
    batch: Tensor
    stride: Tensor
    weight: Tensor
    features: Dict[int, Tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)


def step_instances(ctx, source: str) -> StepInstances:
    """The step's instances from ``source`` ("gt" or "positive_rois"), cached in ``ctx.cache``."""
    key = f"instances_{source}"
    if key in ctx.cache:
        return ctx.cache[key]
    if source == "gt":
        gt = ctx.gt
        boxes, classes, batch = gt["boxes"], gt["classes"], gt["batch"]
    elif source == "positive_rois":
        rois = ctx.rois
        fg = rois.foreground
        boxes, classes, batch = rois.boxes[fg].detach(), rois.labels[fg], rois.batch[fg]
    else:
        raise ValueError(f"instance source must be one of {INSTANCE_SOURCES}, got '{source}'")
    stride = assign_box_levels(boxes, ctx.student_strides)
    weight = torch.ones(len(boxes), device=boxes.device)
    features = {}
    bank = ctx.prototype_bank
    if bank is not None and bank.is_built:
        for s in bank.strides:
            index = (stride == s).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            f_s = instance_features(ctx.student_features[s], boxes[index], batch[index], s)
            f_t = instance_features(ctx.teacher_features[s], boxes[index], batch[index], s)
            weight[index] = bank.robust_weights(s, classes[index], f_s, f_t)
            features[s] = (index, f_s, f_t)
    out = StepInstances(boxes, classes, batch, stride, weight, features)
    ctx.cache[key] = out
    return out


def _cell_span(lo: Tensor, hi: Tensor, stride: int, size: int) -> Tuple[Tensor, Tensor, Tensor]:
    # Cells [floor(lo/s), floor(hi/s)) as the authors slice the mask (end exclusive), clamped
    # to the map; also whether that span is empty (the box is under one cell here).
    first = torch.floor(lo / stride).long().clamp(0, size - 1)
    end = torch.floor(hi / stride).long().clamp(0, size)
    return first, end, end <= first


def instance_weight_map(ctx, instances: StepInstances, stride: int, size) -> Tuple[Tensor, Tensor]:
    """GK's mask M at one stride: each instance assigned to ``stride`` writes its robust
    weight into the cells it covers (the largest where instances overlap); an instance under
    one cell wide or high covers the one cell its top-left corner falls in.

    Returns:
        (Tensor, Tensor): (N, H, W) weights (0 where uncovered) and (N, H, W) bool coverage.
    """
    key = f"mask_{id(instances)}_{stride}_{tuple(size)}"
    if key in ctx.cache:
        return ctx.cache[key]
    h, w = int(size[0]), int(size[1])
    n = len(ctx.gt_instances)
    here = instances.stride == stride
    boxes, batch, weights = instances.boxes[here], instances.batch[here], instances.weight[here]
    x0, x1, x_empty = _cell_span(boxes[:, 0], boxes[:, 2], stride, w)
    y0, y1, y_empty = _cell_span(boxes[:, 1], boxes[:, 3], stride, h)
    # A box under one cell wide or high marks the single cell (y0, x0), as the authors' code
    # does, not a strip of cells along its other side.
    one_cell = x_empty | y_empty
    x1 = torch.where(one_cell, x0 + 1, x1)
    y1 = torch.where(one_cell, y0 + 1, y1)
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    # (m, H, W) coverage of each instance; m, the instances at this stride, is small
    inside = ((ys >= y0[:, None]) & (ys < y1[:, None]))[:, :, None] & (
        (xs >= x0[:, None]) & (xs < x1[:, None])
    )[:, None, :]
    per_box = inside.float() * weights[:, None, None]
    index = batch[:, None, None].expand_as(per_box)
    wmap = torch.zeros(n, h, w, device=boxes.device).scatter_reduce_(0, index, per_box, "amax")
    covered = torch.zeros(n, h, w, device=boxes.device).scatter_add_(0, index, inside.float()) > 0
    ctx.cache[key] = (wmap, covered)
    return wmap, covered


def anchor_robust_weights(ctx) -> Tensor:
    """(N, R) robust weight of each anchor's matched GT (dense students); 1 elsewhere."""
    if "anchor_robust" not in ctx.cache:
        index = ctx.anchors.gt_index  # (N, R), -1 unless positive
        w_gt = step_instances(ctx, "gt").weight
        sizes = [len(g) for g in ctx.gt_instances]
        offsets = torch.tensor([0] + sizes[:-1], device=index.device).cumsum(0)
        flat = (index + offsets[:, None]).clamp(min=0)
        w = w_gt[flat] if len(w_gt) else torch.ones_like(index, dtype=torch.float32)
        ctx.cache["anchor_robust"] = torch.where(index >= 0, w, torch.ones_like(w))
    return ctx.cache["anchor_robust"]


def roi_robust_weights(ctx) -> Tensor:
    """(R,) robust weight of each sampled RoI (two-stage): a foreground RoI's from its own
    features against its matched class' prototypes (the positive-RoI instances); 1 for
    background RoIs."""
    if "roi_robust" not in ctx.cache:
        rois = ctx.rois
        w = torch.ones(len(rois.boxes), device=rois.boxes.device)
        # masked_scatter_ fills the foreground rows in order, as w[fg] = ... does, without
        # the host sync of a boolean index
        w.masked_scatter_(rois.foreground, step_instances(ctx, "positive_rois").weight)
        ctx.cache["roi_robust"] = w
    return ctx.cache["roi_robust"]


GLOBAL_FORMS = ("cosine", "projection")


def projection_coefficients(cos_s: Tensor, cos_t: Tensor, alpha: float) -> Tuple[Tensor, Tensor]:
    """Eq. 5's coefficients of unit-norm instances on unit-norm prototype pairs.

    For an instance (a, b) and a prototype pair (u, v), p = u.a and q = v.b (cosines), the
    coefficients minimising ``|a - c_s u|^2 + |b - c_t v|^2 + alpha (c_s - c_t)^2`` are
    ``c_s = (alpha (p + q) + p) / (1 + 2 alpha)`` and ``c_t = (alpha (p + q) + q) / (1 + 2 alpha)``
    (the pursuit step of PGM, docs/METHODS.md 1.2), so ``c_s - c_t = (p - q) / (1 + 2 alpha)``.

    Args:
        cos_s, cos_t (Tensor): (M, P) cosines of M instances to P prototypes in each space.
    Returns:
        (Tensor, Tensor): (M, P) student and teacher coefficients.
    """
    both = alpha * (cos_s + cos_t)
    return (both + cos_s) / (1 + 2 * alpha), (both + cos_t) / (1 + 2 * alpha)


def cosine_relation_loss(rows_s: Tensor, rows_t: Tensor, weight: Tensor) -> Tensor:
    """The "cosine" global term of one stride: smooth-L1 (beta 1), mean over the (M, P)
    elements, between ``w * rows_s`` and ``w * rows_t`` (``weight`` (M,)), as the authors'
    code computes it."""
    w = weight[:, None]
    return smooth_l1_loss(w * rows_s, w * rows_t, beta=1.0, reduction="mean")


def projection_relation_sum(rows_s: Tensor, rows_t: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """The "projection" global term of one stride before the division by N: for each
    instance, its robust weight times the smooth-L1 (beta 1) distance between its Eq. 5
    coefficients in the two spaces, summed over the P prototypes; summed over the M instances."""
    c_s, c_t = projection_coefficients(rows_s, rows_t, alpha)
    per_instance = smooth_l1_loss(c_s, c_t, beta=1.0, reduction="none").sum(dim=1)
    return (weight * per_instance).sum()


def global_relation_loss(ctx, instances: StepInstances, strides, form: str = "cosine", alpha: float = 10.0) -> Tensor:
    """GK's global term (Eq. 6) over ``strides``, from the cosines of the instances assigned
    to each stride to all valid prototypes (all classes) of that stride, in each space.

    - ``"cosine"``: per stride :func:`cosine_relation_loss`, summed over strides.
    - ``"projection"``: :func:`projection_relation_sum` over every stride, divided by N, the
      instances that have features at a stride of the bank (the paper: "the total number of
      instances").

    The weights are ``instances.weight``. 0 (in the graph) before the prototype bank's first
    build.
    """
    if form not in GLOBAL_FORMS:
        raise ValueError(f"global form must be one of {GLOBAL_FORMS}, got '{form}'")
    total = ctx.zero_loss()
    count = 0
    for s in strides:
        if s not in instances.features:
            continue
        index, f_s, f_t = instances.features[s]
        count += len(index)
        rows_s, rows_t = ctx.prototype_bank.relation_rows(s, f_s, f_t)
        if rows_s.numel() == 0:
            continue
        w = instances.weight[index]
        if form == "cosine":
            total = total + cosine_relation_loss(rows_s, rows_t, w)
        else:
            total = total + projection_relation_sum(rows_s, rows_t, w, alpha)
    if form == "projection" and count > 0:
        total = total / count
    return total
