"""Instance features for GK (METHODS.md 1.1) and the FPN level of a box.

``instance_features`` averages a feature map over the cells each box covers with a
summed-area table (cumulative sums over H and W, four corners gathered per box), so the
cost is O(N C H W + M C) with no Python loop over boxes, and it is differentiable w.r.t.
the features.
"""
import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["instance_features", "assign_box_strides"]


def _cell_range(lo: Tensor, hi: Tensor, stride: int, size: int):
    # Cells [floor(lo/s), floor(hi/s)] inclusive, clamped to the map, at least one cell.
    first = torch.floor(lo / stride).long().clamp(0, size - 1)
    last = torch.floor(hi / stride).long().clamp(0, size - 1)
    return first, torch.maximum(last, first)


def instance_features(features: Tensor, boxes: Tensor, batch_index: Tensor, stride: int) -> Tensor:
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

    boxes = boxes.to(device=features.device, dtype=torch.float64)
    batch_index = batch_index.to(device=features.device, dtype=torch.long)
    x0, x1 = _cell_range(boxes[:, 0], boxes[:, 2], stride, w)
    y0, y1 = _cell_range(boxes[:, 1], boxes[:, 3], stride, h)

    # table[i, :, y, x] = sum of features[i, :, :y, :x] (zero first row and column).
    table = features.to(torch.float64).cumsum(dim=2).cumsum(dim=3)
    table = torch.nn.functional.pad(table, (1, 0, 1, 0))

    def corner(y: Tensor, x: Tensor) -> Tensor:
        return table[batch_index, :, y, x]  # (M, C)

    total = corner(y1 + 1, x1 + 1) - corner(y0, x1 + 1) - corner(y1 + 1, x0) + corner(y0, x0)
    count = ((y1 - y0 + 1) * (x1 - x0 + 1)).to(torch.float64)
    return (total / count[:, None]).to(features.dtype)


def assign_box_strides(boxes: Tensor, strides: Sequence[int]) -> Tensor:
    """FPN stride of each box by ``l = floor(log2(sqrt(w*h) / 56))``, stride ``4 * 2^l``.

    Level 0 is stride 4 (boxes of side 56 to 112 px); the result is clamped to the
    available strides, e.g. with RetinaNet's ``[8, 16, 32, 64, 128]`` every box smaller
    than 112 px goes to stride 8 and degenerate (zero-area) boxes to the smallest stride.

    Args:
        boxes (Tensor): (M, 4) XYXY boxes in input-image pixels.
        strides (sequence of int): the available strides, consecutive powers of two >= 4
            (in any order).

    Returns:
        Tensor: (M,) int64 strides on ``boxes``' device.

    Raises:
        ValueError: malformed boxes or strides that are not consecutive powers of two.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (M, 4) XYXY, got shape {tuple(boxes.shape)}")
    levels = sorted(int(s) for s in strides)
    if not levels:
        raise ValueError("assign_box_strides needs at least one stride")
    logs = [math.log2(s) for s in levels]
    if any(s < 4 or not lg.is_integer() for s, lg in zip(levels, logs)) or any(
        b - a != 1 for a, b in zip(logs, logs[1:])
    ):
        raise ValueError(
            f"strides must be consecutive powers of two >= 4 (e.g. [8, 16, 32, 64, 128]), "
            f"got {list(strides)}"
        )
    lo, hi = int(logs[0]) - 2, int(logs[-1]) - 2  # level l has stride 4 * 2^l
    b = boxes.to(torch.float64)
    area = ((b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0))
    # log2(0) = -inf, which floor and clamp send to the smallest level.
    level = torch.floor(torch.log2(area.sqrt() / 56.0)).clamp(lo, hi).long()
    return 4 * torch.pow(2, level)
