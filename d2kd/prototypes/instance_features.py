"""Instance features for GK (docs/METHODS.md 1.1).

``instance_features`` averages a feature map over the cells each box covers with a
summed-area table (cumulative sums over H and W, four corners gathered per box), so the
cost is O(N C H W + M C) with no Python loop over boxes, and it is differentiable w.r.t.
the features.
"""

import torch
from torch import Tensor

__all__ = ["instance_features", "instance_features_by_masks"]


def _cell_range(lo: Tensor, hi: Tensor, stride: int, size: int):
    # Cells [floor(lo/s), floor(hi/s)] inclusive, clamped to the map, at least one cell.
    first = torch.floor(lo / stride).long().clamp(0, size - 1)
    last = torch.floor(hi / stride).long().clamp(0, size - 1)
    return first, torch.maximum(last, first)


def instance_features(features: Tensor, boxes: Tensor, batch_index: Tensor, stride: int,
                      accumulate: torch.dtype = torch.float64) -> Tensor:
    """Mean of one FPN level over the cells each box covers.

    Box j covers cells ``x in [floor(x1/s), floor(x2/s)]``, ``y in [floor(y1/s), floor(y2/s)]``
    (inclusive, as the reference crops them), clamped to the map and at least one cell;
    a box partly or wholly outside the map averages over the clamped range.

    The summed-area table is accumulated in float64: in float32 a sum over a whole
    ~200x200 map loses ~1e-3 absolute precision, which a one-cell box's four-corner
    difference would inherit in full. The result is cast back to ``features.dtype``.

    Args:
        features (Tensor): (N, C, H, W) one FPN level of a batch.
        boxes (Tensor): (M, 4) XYXY boxes in input-image pixels.
        batch_index (Tensor): (M,) int64 index of each box's image in ``features``
            (values in [0, N); not checked, to keep the call free of host syncs).
        stride (int): the level's stride in input pixels.
        accumulate (torch.dtype): precision of the summed-area table (float64; float32 for a
            caller that rounds the result to float16 anyway).

    Returns:
        Tensor: (M, C) instance features, dtype and device of ``features``; gradients
        flow to ``features``.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (N, C, H, W), got shape {tuple(features.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (M, 4) XYXY, got shape {tuple(boxes.shape)}")
    if batch_index.shape != (boxes.shape[0],):
        raise ValueError(
            f"batch_index must be (M,) = ({boxes.shape[0]},), got shape {tuple(batch_index.shape)}"
        )
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    n, c, h, w = features.shape
    m = boxes.shape[0]
    if m == 0:
        return features.new_zeros((0, c))

    boxes = boxes.to(device=features.device, dtype=torch.float64)  # cell indices stay exact
    batch_index = batch_index.to(device=features.device, dtype=torch.long)
    x0, x1 = _cell_range(boxes[:, 0], boxes[:, 2], stride, w)
    y0, y1 = _cell_range(boxes[:, 1], boxes[:, 3], stride, h)

    # table[i, :, y, x] = sum of features[i, :, :y, :x] (zero first row and column).
    table = features.to(accumulate).cumsum(dim=2).cumsum(dim=3)
    table = torch.nn.functional.pad(table, (1, 0, 1, 0))

    def corner(y: Tensor, x: Tensor) -> Tensor:
        return table[batch_index, :, y, x]  # (M, C)

    total = corner(y1 + 1, x1 + 1) - corner(y0, x1 + 1) - corner(y1 + 1, x0) + corner(y0, x0)
    count = ((y1 - y0 + 1) * (x1 - x0 + 1)).to(accumulate)
    return (total / count[:, None]).to(features.dtype)


def instance_features_by_masks(features: Tensor, boxes: Tensor, batch_index: Tensor, stride: int) -> Tensor:
    """:func:`instance_features` (the same cells, clamped the same way) as two masked
    reductions per image: ``F (C*H, W) @ Mx (W, m)``, then the sum over the rows ``My`` marks.

    One matrix product per call (every image's map against every box's column mask, O(N C H W
    M)), where the summed-area table makes two cumulative sums and a padded copy of the maps:
    for the few boxes of a training step the cheaper way, in a handful of ops. Sums in
    ``features.dtype`` (float32 for a float16 store).

    Args and returns: as :func:`instance_features`.
    """
    n, c, h, w = features.shape
    m = boxes.shape[0]
    if m == 0:
        return features.new_zeros((0, c))
    boxes = boxes.to(device=features.device, dtype=torch.float64)
    batch_index = batch_index.to(device=features.device, dtype=torch.long)
    x0, x1 = _cell_range(boxes[:, 0], boxes[:, 2], stride, w)
    y0, y1 = _cell_range(boxes[:, 1], boxes[:, 3], stride, h)
    cols = torch.arange(w, device=features.device)[:, None]
    rows = torch.arange(h, device=features.device)[:, None]
    mx = ((cols >= x0) & (cols <= x1)).to(features.dtype)  # (W, M)
    my = ((rows >= y0) & (rows <= y1)).to(features.dtype)  # (H, M)
    count = ((y1 - y0 + 1) * (x1 - x0 + 1)).to(features.dtype)
    part = (features.reshape(n * c * h, w) @ mx).view(n, c, h, m)  # (N, C, H, M)
    part = part[batch_index, :, :, torch.arange(m, device=features.device)]  # (M, C, H): own image
    return torch.einsum("mch,hm->mc", part, my) / count[:, None]
