"""Instance features (summed-area table) against a per-box slice-and-mean loop."""
import math

import pytest
import torch

from d2kd.prototypes import instance_features
from d2kd.structures import assign_box_levels


def _naive(features, boxes, batch_index, stride):
    _, _, h, w = features.shape
    rows = []
    for (x1, y1, x2, y2), i in zip(boxes.tolist(), batch_index.tolist()):
        cx0 = min(max(math.floor(x1 / stride), 0), w - 1)
        cx1 = max(min(max(math.floor(x2 / stride), 0), w - 1), cx0)
        cy0 = min(max(math.floor(y1 / stride), 0), h - 1)
        cy1 = max(min(max(math.floor(y2 / stride), 0), h - 1), cy0)
        rows.append(features[i, :, cy0:cy1 + 1, cx0:cx1 + 1].mean(dim=(1, 2)))
    return torch.stack(rows)


def _boxes(stride, h, w):
    return torch.tensor([
        [3.0, 5.0, 60.0, 40.0],                           # interior
        [0.0, 0.0, stride * w, stride * h],               # whole map (x2 lands past the edge)
        [stride * 2 + 1, stride * 3 + 1, stride * 2 + 2, stride * 3 + 2],  # one cell
        [stride * (w - 1), stride * (h - 1), stride * w - 0.5, stride * h - 0.5],  # corner
        [-40.0, -10.0, 20.0, 30.0],                       # partly outside top-left
        [stride * w - 10, stride * h - 10, stride * w + 90, stride * h + 50],  # bottom-right
        [500.0, 500.0, 900.0, 900.0],                     # wholly outside
        [17.0, 9.0, 17.0, 9.0],                           # zero size
        [30.0, 30.0, 20.0, 20.0],                         # inverted: still one cell
    ])


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_matches_naive(stride):
    g = torch.Generator().manual_seed(stride)
    h, w = 13, 17
    features = torch.randn(3, 6, h, w, generator=g) * 5 + 2
    boxes = _boxes(stride, h, w)
    batch_index = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0, 2])
    got = instance_features(features, boxes, batch_index, stride)
    assert got.shape == (9, 6) and got.dtype == features.dtype
    expected = _naive(features, boxes, batch_index, stride)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_random_boxes_match_naive():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 25, 38, generator=g, dtype=torch.float64)
    xy = torch.rand(200, 2, generator=g) * 350 - 25
    wh = torch.rand(200, 2, generator=g) * 120
    boxes = torch.cat([xy, xy + wh], dim=1).double()
    batch_index = torch.randint(2, (200,), generator=g)
    torch.testing.assert_close(
        instance_features(features, boxes, batch_index, 8), _naive(features, boxes, batch_index, 8)
    )


def test_gradients_flow_and_match_naive():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 12.0], [9.0, 4.0, 9.5, 4.5], [-5.0, 10.0, 100.0, 70.0]],
                         dtype=torch.float64)
    batch_index = torch.tensor([0, 1, 1])
    weights = torch.randn(3, 3, generator=g, dtype=torch.float64)
    (instance_features(features, boxes, batch_index, 4) * weights).sum().backward()
    grad = features.grad.clone()
    features.grad = None
    (_naive(features, boxes, batch_index, 4) * weights).sum().backward()
    torch.testing.assert_close(grad, features.grad)
    assert torch.autograd.gradcheck(
        lambda f: instance_features(f, boxes, batch_index, 4), (features,)
    )


def test_float32_one_cell_precision():
    # Large offsets make a float32 summed-area table lose the one-cell values.
    features = torch.randn(1, 2, 64, 64) + 1000.0
    boxes = torch.tensor([[8.0 * 60, 8.0 * 61, 8.0 * 60 + 1, 8.0 * 61 + 1]])
    got = instance_features(features, boxes, torch.tensor([0]), 8)
    torch.testing.assert_close(got[0], features[0, :, 61, 60])


def test_empty_and_invalid():
    features = torch.randn(2, 5, 4, 4)
    out = instance_features(features, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 8)
    assert out.shape == (0, 5)
    with pytest.raises(ValueError):
        instance_features(features[0], torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), 8)
    with pytest.raises(ValueError):
        instance_features(features, torch.zeros(2, 4), torch.zeros(1, dtype=torch.long), 8)
    with pytest.raises(ValueError):
        instance_features(features, torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), 0)


# Box side -> level index under the authors' rule floor(log2(sqrt((w+1)(h+1))/56 + 1e-6)):
# side 56*2^i - 1 is the first of level i (111 -> 1, 223 -> 2, ...), capped at L - 1 = 4.
SIDES = [0, 54, 110, 111, 112, 223, 224, 447, 448, 895, 896, 2000]
LEVELS = [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4]


@pytest.mark.parametrize("strides", [[4, 8, 16, 32, 64], [8, 16, 32, 64, 128]], ids=["faster_rcnn", "retinanet"])
def test_level_rule_indexes_the_detectors_own_levels(strides):
    boxes = torch.tensor([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in SIDES])
    got = assign_box_levels(boxes, strides)
    assert got.dtype == torch.long
    assert got.tolist() == [strides[i] for i in LEVELS]
    # a 150 px box: level index 1, so p3 for Faster R-CNN and p4 for RetinaNet; p7 is used
    assert assign_box_levels(torch.tensor([[0.0, 0.0, 150.0, 150.0]]), strides).item() == strides[1]
    assert assign_box_levels(torch.tensor([[0.0, 0.0, 1000.0, 1000.0]]), strides).item() == strides[-1]


def test_level_rule_uses_the_plus_one_and_any_order():
    # 111 x 111: sqrt(112 * 112) / 56 = 2 exactly -> level 1 (the +1e-6 guards the floor);
    # without the +1 it would be level 0.
    boxes = torch.tensor([[0.0, 0.0, 111.0, 111.0], [0.0, 0.0, 30.0, 400.0]])
    assert assign_box_levels(boxes, [64, 32, 16, 8, 4]).tolist() == [8, 4]  # sqrt(31 * 401) = 111.5
    assert assign_box_levels(torch.zeros(0, 4), [8, 16]).shape == (0,)
    with pytest.raises(ValueError):
        assign_box_levels(torch.zeros(1, 4), [])


def test_the_mask_form_pools_the_cells_of_the_summed_area_form():
    from d2kd.prototypes.instance_features import instance_features_by_masks

    g = torch.Generator().manual_seed(5)
    features = torch.randn(3, 7, 11, 13, generator=g)
    xy = torch.rand(9, 2, generator=g) * torch.tensor([13 * 8.0, 11 * 8.0]) - 10  # some partly outside
    boxes = torch.cat([xy, xy + torch.rand(9, 2, generator=g) * 40], 1)
    index = torch.tensor([0, 2, 2, 1, 0, 2, 1, 1, 0])
    expected = instance_features(features, boxes, index, 8)
    torch.testing.assert_close(instance_features_by_masks(features, boxes, index, 8), expected, rtol=1e-5, atol=1e-5)
    assert instance_features_by_masks(features, boxes[:0], index[:0], 8).shape == (0, 7)
