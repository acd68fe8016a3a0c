"""Instance features for GK (docs/METHODS.md 1.1).

``instance_features`` averages a feature map over the cells each box covers with a
summed-area table (cumulative sums over H and W, four corners gathered per box), so the
cost is O(N C H W + M C) with no Python loop over boxes, and it is differentiable w.r.t.
the features.
"""

import torch
from torch import Tensor

__all__ = ["instance_features", "instance_features_by_masks", "box_cell_weights", "box_cell_weights_per_stride"]


def _cell_range(lo: Tensor, hi: Tensor, stride, size):
    # Cells [floor(lo/s), floor(hi/s)] inclusive, clamped to the map, at least one cell.
    # stride and size: numbers, or tensors that broadcast with lo (several maps at once).
    last_cell = torch.as_tensor(size, device=lo.device) - 1
    first = torch.minimum(torch.floor(lo / stride).long().clamp_(min=0), last_cell)
    last = torch.minimum(torch.floor(hi / stride).long().clamp_(min=0), last_cell)
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


def box_cell_weights_per_stride(boxes: Tensor, batch_index: Tensor, shapes, dtype: torch.dtype, device,
                                slot: Tensor = None, slots: int = None):
    """The averaging weights of :func:`instance_features_by_masks` at several strides at once:
    ``{stride: (N, H*W, S)}`` for ``shapes`` ``{stride: (N, H, W)}``, column ``slot[m]`` of image
    ``batch_index[m]`` holding ``1 / cells`` on the cells box m covers (the same cells, clamped
    the same way, as :func:`instance_features`), 0 elsewhere.

    ``slot`` (M,) and ``slots`` S: the boxes' columns; by default every box its own column
    (S = M). A caller that knows each box's position among its image's boxes passes that and
    the most boxes an image has, so the product computes N * S columns instead of N * M.
    Each stride's weights serve every map of its shape (the student's and the teacher's).
    The cell ranges of every stride come from one set of ops: a training step calls this once."""
    strides = list(shapes)
    m = boxes.shape[0]
    boxes = boxes.to(device=device, dtype=torch.float64)  # cell indices stay exact
    batch_index = batch_index.to(device=device, dtype=torch.long)
    if slot is None:
        slot, slots = torch.arange(m, device=device), m
    slot = slot.to(device)
    # (k, M) cell ranges of every stride at once, the same rule as instance_features
    per = torch.tensor(strides, dtype=torch.float64, device=device)[:, None]
    widths = torch.tensor([shapes[s][2] for s in strides], device=device)[:, None]
    heights = torch.tensor([shapes[s][1] for s in strides], device=device)[:, None]
    x0, x1 = _cell_range(boxes[None, :, 0], boxes[None, :, 2], per, widths)
    y0, y1 = _cell_range(boxes[None, :, 1], boxes[None, :, 3], per, heights)
    inv_count = 1.0 / ((y1 - y0 + 1) * (x1 - x0 + 1)).to(dtype)  # (k, M)
    out = {}
    for i, s in enumerate(strides):
        n, h, w = shapes[s]
        cols, rows = torch.arange(w, device=device), torch.arange(h, device=device)
        mx = ((cols >= x0[i, :, None]) & (cols <= x1[i, :, None])).to(dtype)  # (M, W)
        my = ((rows >= y0[i, :, None]) & (rows <= y1[i, :, None])).to(dtype)  # (M, H)
        box_cells = (my[:, :, None] * (mx * inv_count[i, :, None])[:, None, :]).reshape(m, h * w)
        weights = torch.zeros(n, slots, h * w, dtype=dtype, device=device)
        weights[batch_index, slot] = box_cells
        out[s] = weights.transpose(1, 2)
    return out


def box_cell_weights(boxes: Tensor, batch_index: Tensor, stride: int, shape, dtype: torch.dtype,
                     device, slot: Tensor = None, slots: int = None) -> Tensor:
    """:func:`box_cell_weights_per_stride` at one stride: (N, H*W, S) for a map of ``shape``
    (N, H, W)."""
    return box_cell_weights_per_stride(boxes, batch_index, {stride: tuple(shape)}, dtype, device,
                                       slot, slots)[stride]


def instance_features_by_masks(features: Tensor, boxes: Tensor, batch_index: Tensor, stride: int,
                               weights: Tensor = None, slot: Tensor = None) -> Tensor:
    """:func:`instance_features` (the same cells, clamped the same way) as one batched matrix
    product: each image's map ``(C, H*W)`` against its boxes' averaging weights ``(H*W, S)``
    (:func:`box_cell_weights`), then each box's column of its own image.

    O(N C H W S) multiply-adds in a few ops, where the summed-area table makes two cumulative
    sums and a padded copy of the maps: for the few boxes of a training step the cheaper way.
    Sums in ``features.dtype`` (float32 for a float16 store).

    Args and returns: as :func:`instance_features`; ``weights`` (from :func:`box_cell_weights`
    for these boxes and this map shape, with the same ``slot``) skips building them again.
    """
    n, c, h, w = features.shape
    m = boxes.shape[0]
    if m == 0:
        return features.new_zeros((0, c))
    if slot is None:
        slot = torch.arange(m, device=features.device)
    if weights is None:
        weights = box_cell_weights(boxes, batch_index, stride, (n, h, w), features.dtype, features.device,
                                   slot, m)
    pooled = torch.bmm(features.reshape(n, c, h * w), weights)  # (N, C, S)
    return pooled[batch_index.to(features.device), :, slot.to(features.device)]  # (M, C)
