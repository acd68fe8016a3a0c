"""GK as its authors run it, pinned on small hand-computable inputs: the feature term's
scale, levels averaged or summed, adapters per detector kind, the mask's cells, positive-RoI
instances and response rows, and the per-class prototype images."""
import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from conftest import distill_cfg, fake_context, sampled_rois
from d2kd.engine.prototype_refresh import images_and_classes, per_class_image_subsets
from d2kd.heads.gk import GKHead
from d2kd.heads.robust_weights import instance_weight_map, step_instances


def _gk(tmp_path, channels, strides=(8, 16), student="rcnn", **gk):
    cfg = distill_cfg(tmp_path, student, student, heads=["gk"])
    cfg.DISTILL.GK.RESPONSE_WEIGHT = 0.0
    for k, v in gk.items():
        cfg.DISTILL.GK[k] = v
    shapes = {s: ShapeSpec(channels=channels, stride=s) for s in strides}
    head = GKHead(cfg, shapes, shapes)
    for adapter in head.adapters.adapters.values():  # make the adapter the identity
        conv = adapter[0] if isinstance(adapter, nn.Sequential) else adapter
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = torch.eye(channels)
    return head


def _gt(boxes, classes, size=(32, 32)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.tensor(classes)
    return inst


def _feature_losses(head, channels, student, teacher, gt):
    s = {k: v.expand(-1, channels, -1, -1).clone() for k, v in student.items()}
    t = {k: v.expand(-1, channels, -1, -1).clone() for k, v in teacher.items()}
    ctx = fake_context(s, t, [gt], num_classes=3)
    with EventStorage(0):
        losses = head(ctx)
    return losses["loss_distill_gk_fg"].item(), losses["loss_distill_gk_bg"].item()


def test_feature_term_is_a_channel_mean_levels_averaged_for_two_stage(tmp_path):
    torch.manual_seed(0)
    student = {8: torch.rand(1, 1, 4, 4), 16: torch.rand(1, 1, 2, 2)}
    teacher = {8: torch.rand(1, 1, 4, 4), 16: torch.rand(1, 1, 2, 2)}
    # a 20 px box at (0, 0): level index 0 -> stride 8, cells [0, floor(20/8)) = [0, 2)
    gt = _gt([[0.0, 0.0, 20.0, 20.0]], [1])
    one = _feature_losses(_gk(tmp_path, 1, INSTANCES="gt"), 1, student, teacher, gt)
    wide = _feature_losses(_gk(tmp_path, 256, INSTANCES="gt"), 256, student, teacher, gt)
    assert wide == pytest.approx(one, rel=1e-5)  # replicated channels: the same mean
    # by hand: fg = sum over the 2x2 covered cells of (s - t)^2 / (2 * 1 * 4), at stride 8 only;
    # bg at stride 8 over the other 12 cells, at stride 16 over all 4; levels averaged (/2)
    sq8 = (student[8] - teacher[8])[0, 0] ** 2
    sq16 = (student[16] - teacher[16])[0, 0] ** 2
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    fg = sq8[mask].sum() / (2 * 4) / 2
    bg = (sq8[~mask].sum() / (2 * 12) + sq16.sum() / (2 * 4)) / 2
    assert one[0] == pytest.approx(fg.item(), rel=1e-5)  # DISTILL.GK.FG_WEIGHT 1
    assert one[1] == pytest.approx((bg * 4).item(), rel=1e-5)  # DISTILL.GK.BG_WEIGHT 4


def test_feature_term_levels_summed_for_dense_students(tmp_path):
    torch.manual_seed(1)
    student = {8: torch.rand(1, 1, 4, 4), 16: torch.rand(1, 1, 2, 2)}
    teacher = {8: torch.rand(1, 1, 4, 4), 16: torch.rand(1, 1, 2, 2)}
    gt = _gt([[0.0, 0.0, 20.0, 20.0]], [1])
    two = _feature_losses(_gk(tmp_path, 4, INSTANCES="gt"), 4, student, teacher, gt)
    (tmp_path / "d").mkdir()
    # a dense student sums the levels; the ReLU adapter is the identity on these x >= 0 maps
    dense = _feature_losses(_gk(tmp_path / "d", 4, student="retinanet"), 4, student, teacher, gt)
    assert dense[1] == pytest.approx(2 * two[1], rel=1e-5)


def test_adapter_defaults_per_detector_kind(tmp_path):
    two = _gk(tmp_path, 8)
    conv = two.adapters.adapters["s8"]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    (tmp_path / "d").mkdir()
    dense = _gk(tmp_path / "d", 8, student="retinanet").adapters.adapters["s8"]
    assert isinstance(dense, nn.Sequential) and isinstance(dense[1], nn.ReLU) and dense[0].kernel_size == (3, 3)
    (tmp_path / "o").mkdir()
    relu = _gk(tmp_path / "o", 8, ADAPTER_ACTIVATION="relu", ADAPTER_KERNEL=1).adapters.adapters["s8"]
    assert isinstance(relu, nn.Sequential) and relu[0].kernel_size == (1, 1)
    with pytest.raises(ValueError, match="DISTILL.GK.ADAPTER_ACTIVATION must be one of"):
        _gk(tmp_path / "o", 8, ADAPTER_ACTIVATION="gelu")


def test_mask_cells_are_end_exclusive_and_at_least_one(tmp_path):
    gt = _gt([[8.0, 8.0, 24.0, 24.0], [40.0, 8.0, 44.0, 14.0], [8.0, 40.0, 20.0, 56.0]], [0, 1, 2], size=(64, 64))
    feats = {8: torch.zeros(1, 2, 8, 8)}
    ctx = fake_context(feats, feats, [gt], num_classes=3, strides=(8,))
    weights, covered = instance_weight_map(ctx, step_instances(ctx, "gt"), 8, (8, 8))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:3, 1:3] = True  # x, y in [floor(8/8), floor(24/8)) = [1, 3)
    expected[1, 5] = True      # [5, 5) in x and [1, 1) in y: one cell
    expected[5:7, 1] = True    # x [1, 2), y [5, 7)
    assert torch.equal(covered[0], expected)
    assert torch.equal(weights[0], expected.float())  # no prototypes yet: weight 1


def test_a_box_under_one_cell_wide_or_high_marks_one_cell_as_the_authors(tmp_path):
    # 4 px wide and 32 px high at stride 8: x [floor(8/8), floor(12/8)) = [1, 1) is empty; the
    # authors' code marks the one cell (y0, x0) = (1, 1), not the strip of rows 1-4 in column 1.
    # Likewise 32 px wide and 4 px high: the one cell (5, 3).
    gt = _gt([[8.0, 8.0, 12.0, 40.0], [24.0, 40.0, 56.0, 44.0]], [0, 1], size=(64, 64))
    feats = {8: torch.zeros(1, 2, 8, 8)}
    ctx = fake_context(feats, feats, [gt], num_classes=3, strides=(8,))
    _, covered = instance_weight_map(ctx, step_instances(ctx, "gt"), 8, (8, 8))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1, 1] = True
    expected[5, 3] = True
    assert torch.equal(covered[0], expected)


def _rois_context():
    """One image, one GT box, two sampled RoIs: a positive one offset from the GT box and a
    background one; student and teacher logits agree on the positive RoI only."""
    gt = _gt([[0.0, 0.0, 20.0, 20.0]], [1], size=(64, 64))
    props = Instances((64, 64))
    props.proposal_boxes = Boxes(torch.tensor([[16.0, 16.0, 40.0, 40.0], [40.0, 40.0, 60.0, 60.0]]))
    props.gt_classes = torch.tensor([1, 3])
    props.gt_index = torch.tensor([0, -1])
    student = torch.tensor([[0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    feats = {8: torch.zeros(1, 2, 8, 8)}
    return fake_context(feats, feats, [gt], num_classes=3, rois=sampled_rois([props], student, 3),
                        teacher_logits=teacher, strides=(8,))


def test_positive_roi_instances_are_the_default_for_two_stage(tmp_path):
    head = _gk(tmp_path, 2, strides=(8,))
    assert head.instances == "positive_rois" and "student.rois" in head.requires
    ctx = _rois_context()
    instances = step_instances(ctx, head.instances)
    assert instances.boxes.tolist() == [[16.0, 16.0, 40.0, 40.0]] and instances.classes.tolist() == [1]
    _, covered = instance_weight_map(ctx, instances, 8, (8, 8))
    assert covered[0, 2:5, 2:5].all() and covered[0].sum() == 9  # the RoI's cells, not the GT's
    (tmp_path / "g").mkdir()
    assert _gk(tmp_path / "g", 2, strides=(8,), INSTANCES="gt").instances == "gt"
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="'positive_rois' needs a two-stage student"):
        _gk(tmp_path / "d", 2, strides=(8,), student="retinanet", INSTANCES="positive_rois")


@pytest.mark.parametrize("rows,positive", [("positive", True), ("all", False)])
def test_response_rows(tmp_path, rows, positive):
    head = _gk(tmp_path, 2, strides=(8,), RESPONSE_ROIS=rows)
    head.response_weight = 1.0
    with EventStorage(0):
        loss = head(_rois_context())["loss_distill_gk_response"].item()
    if positive:
        assert loss == pytest.approx(0.0, abs=1e-7)  # the models agree on the positive RoI
    else:
        assert loss > 0.1


def _records(num_images, rare_every, min_side=40):
    """COCO-style dataset dicts: class 0 in every image, class 1 in every ``rare_every``-th,
    a small class-2 box (too small) everywhere and a crowd class-3 box."""
    records = []
    for i in range(num_images):
        anns = [
            {"bbox": [0, 0, min_side, min_side], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
            {"bbox": [0, 0, 5, 50], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2},
            {"bbox": [0, 0, 60, 60], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 3, "iscrowd": 1},
        ]
        if i % rare_every == 0:
            anns.append({"bbox": [10, 10, 50, 60], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1})
        records.append({"image_id": i, "annotations": anns})
    return records


def test_prototype_images_are_drawn_per_class():
    records = _records(1000, rare_every=100)  # class 1 is in 1% of the images
    subsets = per_class_image_subsets(records, max_images=8, min_size=30, seed=0)
    assert sorted(subsets) == [0, 1]  # class 2's boxes are 5 px wide; class 3 is crowd only
    assert len(subsets[0]) == 8 and len(subsets[1]) == 8
    assert all(i % 100 == 0 for i in subsets[1])  # every image drawn for class 1 holds it
    everything = per_class_image_subsets(records, max_images=800, min_size=30, seed=0)
    assert len(everything[1]) == 10 and len(everything[0]) == 800
    # a total budget (the old rule) would give the rare class about 8 of 800 images
    union = images_and_classes(subsets)
    assert all(classes == sorted(classes) and set(classes) <= {0, 1} for _, classes in union)


def test_prototype_images_are_the_same_on_every_rank_and_after_resume():
    records = _records(500, rare_every=7)
    first = per_class_image_subsets(records, max_images=20, min_size=30, seed=3)
    again = per_class_image_subsets(records, max_images=20, min_size=30, seed=3)  # another rank / a resume
    assert first.keys() == again.keys() and all(np.array_equal(first[c], again[c]) for c in first)
    other = per_class_image_subsets(records, max_images=20, min_size=30, seed=4)
    assert not np.array_equal(first[0], other[0])
    # "boxes > MIN_SIZE original pixels", strictly: 30 x 30 boxes do not count at 30
    assert 0 not in per_class_image_subsets(_records(10, 1, min_side=30), 5, min_size=30, seed=0)
