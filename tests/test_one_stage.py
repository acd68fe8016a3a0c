"""One-stage methods: the GFL meta-architecture (ATSS, QFL, DFL, distribution boxes), its
Distill variant, and the Rank Mimicking, PFI and LD heads on hand-computable inputs."""
import math
from typing import Dict

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from torch import Tensor

from conftest import detector_cfg, distill_cfg, random_batch, save_plain_model, write_yaml
from d2kd.config import add_gfl_config, load_config
from d2kd.heads import DISTILL_HEAD_REGISTRY, DistillHead
from d2kd.heads.ld import LDHead, edge_kl, pairwise_diou, vlr_weights
from d2kd.heads.pfi import PFIHead, prediction_difference
from d2kd.heads.rank_mimic import RankMimicHead, rank_mimic_loss
from d2kd.modeling import DENSE, GFL_KIND, kind_of
from d2kd.modeling.gfl import (
    DistanceBoxTransform, atss_assign, atss_thresholds, distribution_focal_loss, distribution_to_distance,
    quality_focal_loss,
)
from d2kd.structures import AnchorMatches, DenseOutputs, DistillContext


# ---------------------------------------------------------------- helpers
def gfl_cfg(fpn_channels: int = 32, num_classes: int = 3):
    """A tiny plain GFL (GroupNorm needs channels divisible by 32)."""
    cfg = detector_cfg("retinanet", fpn_channels, num_classes=num_classes)
    cfg.MODEL.META_ARCHITECTURE = "GFL"
    cfg.MODEL.GFL.NUM_CLASSES = num_classes
    cfg.MODEL.GFL.NUM_CONVS = 1
    cfg.MODEL.GFL.SCORE_THRESH_TEST = 0.0  # random models: keep every box
    return cfg


def distill_gfl_cfg(tmp_path, heads=("ld",)):
    teacher = gfl_cfg(64)
    t_yaml = write_yaml(teacher, tmp_path / "teacher_gfl.yaml")
    t_weights = str(tmp_path / "teacher_gfl.pth")
    save_plain_model(teacher, t_weights, seed=1)
    cfg = gfl_cfg(32)
    cfg.MODEL.META_ARCHITECTURE = "DistillGFL"
    cfg.DISTILL.TEACHER.CONFIG_FILE = t_yaml
    cfg.DISTILL.TEACHER.WEIGHTS = t_weights
    cfg.DISTILL.HEADS = list(heads)
    cfg.SOLVER.MAX_ITER = 10
    return cfg


class FakeDenseStep:
    """A hand-made step of a dense pair: features, both dense outputs and the anchors."""

    def __init__(self, dense_s, dense_t, anchors, features_s=None, features_t=None):
        self._dense = {"student": dense_s, "teacher": dense_t}
        self._features = {"student": features_s, "teacher": features_t}
        self._anchors = anchors
        self.common_strides = sorted(dense_s.strides)
        self.device = torch.device("cpu")

    def dense(self, side):
        return self._dense[side]

    def features(self, side):
        return self._features[side]

    def anchors(self):
        return self._anchors


def one_level_dense(cls: Tensor, box: Tensor = None, stride: int = 8) -> DenseOutputs:
    """(N, C, 1, W) class maps (and box maps) of a single level with one anchor per cell."""
    branches = [{stride: cls}] + ([{stride: box}] if box is not None else [])
    return DenseOutputs(strides=[stride], num_anchors=[1], branches=branches)


def row_anchors(num: int, stride: int = 8, size: float = 16.0) -> Boxes:
    """``num`` square anchors along y = 0, in the layout of a (1, num) map."""
    cx = torch.arange(num, dtype=torch.float32) * stride
    return Boxes(torch.stack([cx - size / 2, -size / 2 + 0 * cx, cx + size / 2, size / 2 + 0 * cx], 1))


def matches(anchors: Boxes, gt_per_image, labels: Tensor, matched: Tensor, num_classes: int, stride=8):
    ious = [pairwise_iou(g.gt_boxes, anchors) for g in gt_per_image]
    return AnchorMatches(
        strides=[stride], num_anchors=[1], anchors={stride: anchors}, ious=ious, matched_gt=matched,
        matched_iou=torch.zeros(matched.shape), labels=labels, num_classes=num_classes,
    )


def instances(boxes, classes, size=(32, 64)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def head(cls, cfg=None, shapes=None):
    cfg = cfg or detector_cfg("retinanet")
    cfg.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
    shapes = shapes or {}
    return cls(cfg, shapes, shapes)


def hand_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


# ---------------------------------------------------------------- Rank Mimicking
def rm_context(student_scores, teacher_scores, order=(0, 1, 2, 3)):
    """One image, one GT (class 1 of 2) with three candidate anchors and one background
    anchor; ``order`` places candidate i at map column order[i]."""
    width = 4
    cls_s, cls_t = torch.zeros(1, 2, 1, width), torch.zeros(1, 2, 1, width)
    labels = torch.full((1, width), 2)
    matched = torch.full((1, width), -1)
    for i, (s, t) in enumerate(zip(student_scores + [-3.0], teacher_scores + [5.0])):
        col = order[i]
        cls_s[0, 1, 0, col], cls_t[0, 1, 0, col] = s, t
        if i < 3:
            labels[0, col], matched[0, col] = 1, 0
    cls_s.requires_grad_(True)
    gts = [instances([[0, -8, 24, 8]], [1])]
    anchors = matches(row_anchors(width), gts, labels, matched, 2)
    step = FakeDenseStep(one_level_dense(cls_s), one_level_dense(cls_t), anchors)
    return DistillContext(step, gt_instances=gts, num_classes=2, student_strides=[8]), cls_s


@pytest.mark.parametrize("scores", ["sigmoid", "logits"])
def test_rank_mimic_one_gt_three_candidates_is_the_hand_kl(scores):
    cfg = detector_cfg("retinanet")
    cfg.DISTILL.RANK_MIMIC.SCORES = scores
    rm = head(RankMimicHead, cfg)
    s, t = [0.5, -1.0, 2.0], [1.5, 0.3, -0.7]
    ctx, _ = rm_context(s, t)
    loss = rm(ctx)["loss_distill_rank_mimic"]
    f = (lambda x: 1 / (1 + math.exp(-x))) if scores == "sigmoid" else (lambda x: x)
    expected = hand_kl(softmax([f(x) for x in t]), softmax([f(x) for x in s]))
    assert loss.item() == pytest.approx(4.0 * expected, rel=1e-5)  # default weight 4


@pytest.mark.parametrize("temperature", [0.2, 2.0])
def test_rank_mimic_temperature_divides_the_sigmoid_scores(temperature):
    cfg = detector_cfg("retinanet")
    cfg.DISTILL.RANK_MIMIC.TEMPERATURE = temperature
    rm = head(RankMimicHead, cfg)
    s, t = [0.5, -1.0, 2.0], [1.5, 0.3, -0.7]
    loss = rm(rm_context(s, t)[0])["loss_distill_rank_mimic"]
    sig = [1 / (1 + math.exp(-x)) for x in s], [1 / (1 + math.exp(-x)) for x in t]
    expected = hand_kl(softmax([x / temperature for x in sig[1]]), softmax([x / temperature for x in sig[0]]))
    assert loss.item() == pytest.approx(4.0 * expected, rel=1e-5)
    from d2kd.value_checks import problems

    cfg.DISTILL.RANK_MIMIC.TEMPERATURE = 0.0  # checked by its name, as every temperature
    assert problems(cfg, ["DISTILL.RANK_MIMIC"]) == ["DISTILL.RANK_MIMIC.TEMPERATURE = 0.0: must be > 0"]


def test_rank_mimic_keeps_the_anchor_correspondence():
    rm = head(RankMimicHead)
    s, t = [0.5, -1.0, 2.0], [1.5, 0.3, -0.7]
    base = rm(rm_context(s, t)[0])["loss_distill_rank_mimic"]
    # the same candidates at other positions on the map: nothing changes
    moved = rm(rm_context(s, t, order=(3, 0, 2, 1))[0])["loss_distill_rank_mimic"]
    assert moved.item() == pytest.approx(base.item(), rel=1e-5)
    # the teacher's scores of two candidates swapped: the loss changes (a sorted version would not)
    swapped = rm(rm_context(s, [t[1], t[0], t[2]])[0])["loss_distill_rank_mimic"]
    assert abs(swapped.item() - base.item()) > 1e-3


def test_rank_mimic_vectorised_equals_a_loop_over_gts():
    g = torch.Generator().manual_seed(0)
    m = 40
    segment = torch.randint(0, 7, (m,), generator=g) * 3  # sparse ids, one id unused
    s, t = torch.randn(m, generator=g), torch.randn(m, generator=g)
    per_gt = []
    for j in segment.unique():
        rows = segment == j
        p_t, log_p_s = torch.softmax(t[rows], 0), torch.log_softmax(s[rows], 0)
        per_gt.append((p_t * (p_t.log() - log_p_s)).sum())
    assert rank_mimic_loss(s, t, segment).item() == pytest.approx(torch.stack(per_gt).mean().item(), rel=1e-5)
    empty = torch.zeros(0, requires_grad=True)
    assert rank_mimic_loss(empty, empty, torch.zeros(0, dtype=torch.long)).item() == 0


def test_rank_mimic_gradient_reaches_only_the_candidates():
    ctx, cls_s = rm_context([0.5, -1.0, 2.0], [1.5, 0.3, -0.7])
    head(RankMimicHead)(ctx)["loss_distill_rank_mimic"].backward()
    grad = cls_s.grad[0, :, 0]  # (C, W)
    assert grad[1, :3].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[1, 3] == 0


# ---------------------------------------------------------------- PFI
def test_pfi_mask_is_the_detached_channel_mean():
    g = torch.Generator().manual_seed(0)
    cls_s = torch.randn(2, 6, 3, 4, generator=g, requires_grad=True)  # A=2 anchors x C=3 classes
    cls_t = torch.randn(2, 6, 3, 4, generator=g)
    p = prediction_difference(cls_s, cls_t)
    assert not p.requires_grad and p.shape == (2, 3, 4)
    expected = ((cls_s.detach().sigmoid() - cls_t.sigmoid()) ** 2).mean(dim=1)
    assert torch.allclose(p, expected)
    assert torch.allclose(prediction_difference(cls_s, cls_t, sigmoid=False), ((cls_s.detach() - cls_t) ** 2).mean(1))


def test_pfi_loss_is_the_prediction_weighted_feature_error():
    from detectron2.layers import ShapeSpec

    g = torch.Generator().manual_seed(1)
    strides = (8, 16)
    shapes = {s: ShapeSpec(channels=4, stride=s) for s in strides}
    cfg = detector_cfg("retinanet")
    cfg.DISTILL.PFI.ADAPTER = "auto"  # equal channels: no adapter, A is the identity
    pfi = head(PFIHead, cfg, shapes)
    assert len(pfi.adapters.adapters) == 0
    sizes = {8: (4, 6), 16: (2, 3)}
    f_s = {s: torch.randn(2, 4, *sizes[s], generator=g, requires_grad=True) for s in strides}
    f_t = {s: torch.randn(2, 4, *sizes[s], generator=g) for s in strides}
    c_s = {s: torch.randn(2, 3, *sizes[s], generator=g, requires_grad=True) for s in strides}
    c_t = {s: torch.randn(2, 3, *sizes[s], generator=g) for s in strides}
    dense = lambda c: DenseOutputs(strides=list(strides), num_anchors=[1, 1], branches=[c])  # noqa: E731
    step = FakeDenseStep(dense(c_s), dense(c_t), None, f_s, f_t)
    ctx = DistillContext(step, gt_instances=[], num_classes=3, student_strides=list(strides))
    loss = pfi(ctx)["loss_distill_pfi"]
    per_level = []
    for s in strides:
        n, _, h, w = f_s[s].shape
        p = ((c_s[s].detach().sigmoid() - c_t[s].sigmoid()) ** 2).mean(1)
        per_level.append((p * ((f_t[s] - f_s[s].detach()) ** 2).mean(1)).sum() / (n * h * w))
    assert loss.item() == pytest.approx(1.5 * sum(per_level).item() / 2, rel=1e-5)
    loss.backward()
    assert all(c_s[s].grad is None for s in strides)  # the mask is detached
    assert all(f_s[s].grad.abs().sum() > 0 for s in strides)


# ---------------------------------------------------------------- LD
def test_edge_kl_on_a_known_pair_of_distributions():
    t = 10.0
    q = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3], [0.25, 0.5, 0.25]]
    teacher = torch.tensor([[t * math.log(v) for v in edge] for edge in q]).reshape(1, 12)  # softmax(z/T) = q
    student = torch.zeros(1, 12)  # uniform at any temperature
    kl = edge_kl(student, teacher, t)
    expected = [t * t * hand_kl(edge, [1 / 3] * 3) / 3 for edge in q]  # T^2 * mean over the 3 bins
    assert kl.shape == (1, 4)
    assert kl[0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert kl[0, 2].item() == pytest.approx(0.0, abs=1e-6)


def test_diou_by_hand():
    a = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    b = torch.tensor([[8.0, 0.0, 24.0, 16.0]])
    # IoU 128 / 384; centres 8 px apart; enclosing box 24 x 16
    assert pairwise_diou(a, b).item() == pytest.approx(1 / 3 - 64 / (24 ** 2 + 16 ** 2), rel=1e-6)


def test_vlr_membership_on_a_hand_made_anchor_set():
    # five 16 px anchors shifted right by 0, 4, 8, 12, 16 px from the GT box [0, 0, 16, 16]
    shifts = [0, 4, 8, 12, 16]
    anchors = torch.tensor([[d, 0.0, d + 16.0, 16.0] for d in shifts])
    gt = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    ious = [(16 - d) / (16 + d) for d in shifts]
    dious = [iou - d * d / ((16 + d) ** 2 + 16 ** 2) for iou, d in zip(ious, shifts)]
    mean = sum(ious) / 5
    t_g = mean + math.sqrt(sum((x - mean) ** 2 for x in ious) / 4)  # all five are candidates
    member = [0.25 * t_g <= x < t_g for x in dious]
    assert member == [False, True, True, False, False]  # the hand numbers: t_g = 0.812
    w = vlr_weights([anchors], gt, topk=9)
    assert (w > 0).tolist() == member
    assert w[1].item() == pytest.approx(0.6) and w[2].item() == pytest.approx(1 / 3)
    # an anchor in two GT boxes' VLRs takes its larger IoU; without GT boxes there is no VLR
    assert vlr_weights([anchors], gt.new_zeros(0, 4)).sum() == 0


def test_atss_threshold_is_mean_plus_std_of_the_nearest_anchors_per_level():
    # one shared rule (d2kd.structures.atss) serves GFL's assignment and LD's VLR
    from d2kd.structures.atss import atss_thresholds

    g = torch.Generator().manual_seed(3)
    levels = [row_anchors(12, 8, 32).tensor, row_anchors(6, 16, 64).tensor]
    xy = torch.rand(4, 2, generator=g) * 60
    gt = torch.cat([xy, xy + 10 + torch.rand(4, 2, generator=g) * 30], 1)
    iou = pairwise_iou(Boxes(torch.cat(levels)), Boxes(gt))
    _, thr = atss_thresholds(levels, gt, iou, 5)
    for j in range(len(gt)):
        picked, start = [], 0
        for anchors in levels:
            centre = (anchors[:, :2] + anchors[:, 2:]) / 2
            d = ((centre - (gt[j, :2] + gt[j, 2:]) / 2) ** 2).sum(-1)
            picked += [start + i for i in sorted(range(len(anchors)), key=lambda i: d[i].item())[:5]]
            start += len(anchors)
        values = iou[picked, j]
        assert thr[j].item() == pytest.approx((values.mean() + values.std()).item(), abs=1e-6)


def ld_context(student_box, teacher_box, cls_s, cls_t, labels, matched, gts, width):
    anchors = matches(row_anchors(width), gts, labels, matched, cls_s.shape[1])
    step = FakeDenseStep(one_level_dense(cls_s, student_box), one_level_dense(cls_t, teacher_box), anchors)
    return DistillContext(step, gt_instances=gts, num_classes=cls_s.shape[1], student_strides=[8])


def test_ld_head_main_vlr_and_class_terms_by_hand():
    g = torch.Generator().manual_seed(0)
    width, bins, classes = 6, 5, 3
    box_s = torch.randn(1, 4 * bins, 1, width, generator=g, requires_grad=True)
    box_t = torch.randn(1, 4 * bins, 1, width, generator=g)
    cls_s = torch.randn(1, classes, 1, width, generator=g, requires_grad=True)
    cls_t = torch.randn(1, classes, 1, width, generator=g)
    labels = torch.tensor([[3, 2, 2, 3, 3, 3]])
    matched = torch.tensor([[-1, 0, 0, -1, -1, -1]])
    gts = [instances([[2, -8, 18, 8]], [2])]  # VLR: the anchor at x = 16 (DIoU .41, t_g .56)
    ctx = ld_context(box_s, box_t, cls_s, cls_t, labels, matched, gts, width)
    losses = head(LDHead)(ctx)
    flat = lambda x: x[0, :, 0].t()  # noqa: E731  (R, K)
    s_box, t_box, s_cls, t_cls = flat(box_s), flat(box_t), flat(cls_s), flat(cls_t)
    pos = [1, 2]
    w = s_cls.detach().sigmoid().max(1).values
    main = sum(w[r] * edge_kl(s_box[r:r + 1], t_box[r:r + 1], 10.0).mean() for r in pos)
    assert losses["loss_distill_ld"].item() == pytest.approx(0.25 * main.item(), rel=1e-5)
    v = vlr_weights([row_anchors(width).tensor], gts[0].gt_boxes.tensor)
    assert (v > 0).any()
    vlr = sum(v[r] * edge_kl(s_box[r:r + 1], t_box[r:r + 1], 10.0).sum() for r in range(width) if v[r] > 0) / 16
    assert losses["loss_distill_ld_vlr"].item() == pytest.approx(0.25 * vlr.item(), rel=1e-5)
    kd = sum(4 * hand_kl(softmax((t_cls[r] / 2).tolist()), softmax((s_cls[r] / 2).tolist())) / classes for r in pos) / 2
    assert losses["loss_distill_ld_kd"].item() == pytest.approx(10 * kd, rel=1e-4)
    sum(losses.values()).backward()
    assert box_s.grad.abs().sum() > 0


# ---------------------------------------------------------------- GFL pieces
def test_distribution_to_distance_decoding():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    logits = torch.cat([probs.clamp(min=1e-12).log(), torch.tensor([0.0, -50, -50, -50, -50]),
                        torch.tensor([-50.0, -50, -50, -50, 0]), torch.zeros(5)])
    d = distribution_to_distance(logits[None], reg_max=4)
    assert d[0].tolist() == pytest.approx([2.0, 0.0, 4.0, 2.0], abs=1e-5)
    # pixels: distances times the stride, from the anchor centre
    box = DistanceBoxTransform().apply_deltas(d * 8, torch.tensor([[0.0, 0.0, 64.0, 64.0]]))
    assert box[0].tolist() == pytest.approx([32 - 16, 32 - 0, 32 + 32, 32 + 16], abs=1e-4)


def test_dfl_on_an_integer_target_is_the_log_probability_of_its_bin():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 17, generator=g)
    target = torch.tensor([0.0, 3.0, 7.0, 16.0])
    log_p = torch.log_softmax(logits, 1)
    assert torch.allclose(distribution_focal_loss(logits, target), -log_p[torch.arange(4), target.long()], atol=1e-6)
    # between two bins: the linear interpolation of their cross-entropies
    y = torch.tensor([3.25])
    expected = -(0.75 * log_p[1, 3] + 0.25 * log_p[1, 4])
    assert distribution_focal_loss(logits[1:2], y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_quality_focal_loss_by_hand():
    logits = torch.tensor([[0.0, -2.0]])
    loss = quality_focal_loss(logits, torch.tensor([0]), torch.tensor([0.8]), beta=2.0)
    p0, p1 = 0.5, 1 / (1 + math.exp(2.0))
    bce0 = -(0.8 * math.log(p0) + 0.2 * math.log(1 - p0))
    assert loss[0, 0].item() == pytest.approx(bce0 * (0.8 - p0) ** 2, rel=1e-6)
    assert loss[0, 1].item() == pytest.approx(-math.log(1 - p1) * p1 ** 2, rel=1e-6)


ATSS_LEVELS = [
    torch.tensor([[0.0, 0, 16, 16], [16, 0, 32, 16], [32, 0, 48, 16], [48, 0, 64, 16]]),  # 16 px anchors
    torch.tensor([[0.0, 0, 32, 32], [32, 0, 64, 32]]),  # 32 px anchors
]


def test_atss_on_a_hand_made_case():
    # GT [0, 0, 20, 16], top-2 per level: candidates a0, a1 (IoU .8, .125), b0, b1 (.3125, 0);
    # threshold mean + std = .661; only a0 passes (and its centre is inside)
    gt = torch.tensor([[0.0, 0, 20, 16]])
    _, thr = atss_thresholds(ATSS_LEVELS, gt, pairwise_iou(Boxes(torch.cat(ATSS_LEVELS)), Boxes(gt)), 2)
    ious = [0.8, 0.125, 0.3125, 0.0]
    mean = sum(ious) / 4
    assert thr.item() == pytest.approx(mean + math.sqrt(sum((x - mean) ** 2 for x in ious) / 3), rel=1e-5)
    assert atss_assign(ATSS_LEVELS, gt, topk=2).tolist() == [0, -1, -1, -1, -1, -1]
    # a second GT [0, 0, 16, 18] also takes a0 (IoU .889 > .8): the higher IoU wins
    two = torch.tensor([[0.0, 0, 20, 16], [0.0, 0, 16, 18]])
    assert atss_assign(ATSS_LEVELS, two, topk=2).tolist() == [1, -1, -1, -1, -1, -1]
    # GT [0, 0, 16, 7]: a0 passes the IoU threshold (.4375 >= .344) but its centre (8, 8) is
    # outside the box, so nothing is positive
    flat = torch.tensor([[0.0, 0, 16, 7]])
    _, thr = atss_thresholds(ATSS_LEVELS, flat, pairwise_iou(Boxes(torch.cat(ATSS_LEVELS)), Boxes(flat)), 2)
    assert thr.item() == pytest.approx(0.344, abs=1e-3)
    assert atss_assign(ATSS_LEVELS, flat, topk=2).tolist() == [-1] * 6
    assert atss_assign(ATSS_LEVELS, gt.new_zeros(0, 4)).tolist() == [-1] * 6


def atss_reference(levels, gt, topk):
    """ATSS written as the paper states it, one GT box at a time."""
    anchors = torch.cat(levels)
    iou = pairwise_iou(Boxes(anchors), Boxes(gt))
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = torch.full((len(anchors),), -1.0)
    out = torch.full((len(anchors),), -1)
    for j, box in enumerate(gt):
        c = (box[:2] + box[2:]) / 2
        cand, start = [], 0
        for level in levels:
            d = ((centres[start:start + len(level)] - c) ** 2).sum(1).sqrt()
            cand += (d.argsort()[:topk] + start).tolist()
            start += len(level)
        values = iou[cand, j]
        thr = values.mean() + values.std()
        for a in cand:
            x, y = centres[a].tolist()
            inside = min(x - box[0], y - box[1], box[2] - x, box[3] - y) > 0.01
            if iou[a, j] >= thr and inside and iou[a, j] > best[a]:
                best[a], out[a] = iou[a, j], j
    return out


def test_atss_matches_a_per_gt_reference():
    g = torch.Generator().manual_seed(5)
    levels = [
        torch.cat([row_anchors(10, 8, 64).tensor + torch.tensor([0.0, y, 0, y]) for y in range(0, 80, 8)]),
        torch.cat([row_anchors(5, 16, 128).tensor + torch.tensor([0.0, y, 0, y]) for y in range(0, 80, 16)]),
    ]
    for _ in range(5):
        xy = torch.rand(5, 2, generator=g) * 60
        gt = torch.cat([xy, xy + 8 + torch.rand(5, 2, generator=g) * 40], 1)
        assert torch.equal(atss_assign(levels, gt, topk=9), atss_reference(levels, gt, 9))


def test_gfl_config_keys_and_kind():
    cfg = get_cfg()
    add_gfl_config(cfg)
    node = cfg.MODEL.GFL
    assert (node.REG_MAX, node.TOPK, node.QFL_BETA, node.OCTAVE_BASE_SCALE) == (16, 9, 2.0, 8.0)
    assert (node.QFL_WEIGHT, node.DFL_WEIGHT, node.GIOU_WEIGHT) == (1.0, 0.25, 2.0)
    assert "GFL" in detector_cfg("retinanet").MODEL  # add_distill_config adds it
    gfl = build_model(gfl_cfg())
    assert kind_of(gfl) is GFL_KIND and "box_distribution" in GFL_KIND.capabilities
    assert kind_of(build_model(detector_cfg("retinanet"))) is DENSE
    sizes = [c[0, 2] - c[0, 0] for c in gfl.anchor_generator.cell_anchors]
    assert [float(s) for s in sizes] == [8.0 * s for s in (8, 16, 32, 64, 128)]


# ---------------------------------------------------------------- models
def test_plain_gfl_trains_three_iterations_and_infers_instances():
    torch.manual_seed(0)
    model = build_model(gfl_cfg())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with EventStorage(0) as storage:
        for it in range(3):
            storage.iter = it
            losses = model(random_batch(seed=it, empty_last=it == 1))
            assert set(losses) == {"loss_qfl", "loss_dfl", "loss_giou"}
            assert all(torch.isfinite(v) for v in losses.values())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(random_batch(num_images=2))
    inst = out[0]["instances"]
    assert isinstance(inst, Instances) and len(inst) > 0
    assert inst.image_size == (64, 80) and inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_classes")
    assert (inst.pred_boxes.tensor[:, 2:] >= inst.pred_boxes.tensor[:, :2]).all()


@DISTILL_HEAD_REGISTRY.register()
class OneStageProbeHead(DistillHead):
    """Keeps the context it was given (tests read it after the step)."""

    last = None
    requires = frozenset({"student.anchors"})

    def forward(self, ctx) -> Dict[str, Tensor]:
        OneStageProbeHead.last = ctx
        return {}


def _train_step(cfg):
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(random_batch(empty_last=True))
    return model, losses


def _check_step(model, losses, distill_keys):
    assert set(distill_keys) <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    student = [p for n, p in model.named_parameters() if not n.startswith("distill_heads.")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)


def test_distill_gfl_with_ld_trains_a_step(tmp_path):
    model, losses = _train_step(distill_gfl_cfg(tmp_path, heads=["ld"]))
    assert type(model).__name__ == "DistillGFL" and model.teacher_kind is GFL_KIND
    _check_step(model, losses, ["loss_distill_ld", "loss_distill_ld_vlr", "loss_distill_ld_kd"])
    assert losses["loss_distill_ld"].item() > 0 and losses["loss_distill_ld_vlr"].item() > 0


def test_distill_gfl_context_uses_the_atss_assignment(tmp_path):
    model, _ = _train_step(distill_gfl_cfg(tmp_path, heads=["onestageprobe"]))
    ctx = OneStageProbeHead.last
    anchors = ctx.anchors
    level = [anchors.anchors[s].tensor for s in anchors.strides]
    for i, gts in enumerate(ctx.gt_instances):
        assigned = atss_assign(level, gts.gt_boxes.tensor, 9)
        assert torch.equal(anchors.gt_index[i], assigned)
        pos = assigned >= 0
        assert torch.equal(anchors.labels[i][pos], gts.gt_classes[assigned[pos]])
        assert (anchors.labels[i][~pos] == 3).all()
    assert anchors.positive[0].any() and not anchors.positive[1].any()


@pytest.mark.parametrize("name,keys", [("rank_mimic", ["loss_distill_rank_mimic"]), ("pfi", ["loss_distill_pfi"])])
def test_distill_retinanet_with_rm_or_pfi_trains_a_step(tmp_path, name, keys):
    model, losses = _train_step(distill_cfg(tmp_path, "retinanet", "retinanet", heads=[name]))
    _check_step(model, losses, keys)
    assert losses[keys[0]].item() > 0


def test_distill_gfl_with_rm_and_pfi_trains_a_step(tmp_path):
    model, losses = _train_step(distill_gfl_cfg(tmp_path, heads=["rank_mimic", "pfi"]))
    _check_step(model, losses, ["loss_distill_rank_mimic", "loss_distill_pfi"])


def test_ld_on_a_retinanet_pair_is_refused_at_build(tmp_path):
    cfg = distill_cfg(tmp_path, "retinanet", "retinanet", heads=["ld"])
    with pytest.raises(ValueError, match=r"head 'ld' requires 'student.box_distribution'.*DistillRetinaNet") as e:
        build_model(cfg)
    assert "GFL" in str(e.value)


def test_ld_with_a_retinanet_teacher_is_refused_at_build(tmp_path):
    cfg = distill_gfl_cfg(tmp_path, heads=["ld"])
    retina = detector_cfg("retinanet", 32)
    cfg.DISTILL.TEACHER.CONFIG_FILE = write_yaml(retina, tmp_path / "retina.yaml")
    with pytest.raises(ValueError, match=r"head 'ld'.*GFL detector"):
        build_model(cfg)


def test_a_gfl_teacher_with_other_classes_names_the_gfl_key(tmp_path):
    from d2kd.modeling.teacher import TeacherConfigError

    cfg = distill_gfl_cfg(tmp_path, heads=["ld"])
    cfg.DISTILL.TEACHER.OPTS = ["MODEL.GFL.NUM_CLASSES", "5"]
    with pytest.raises(TeacherConfigError, match=r"teacher predicts 5 classes.*MODEL\.GFL\.NUM_CLASSES"):
        build_model(cfg)


def test_distilled_gfl_student_is_a_plain_gfl(tmp_path):
    """The student's config and weights, as export reads them, build and load as a plain GFL in
    stock detectron2 plus d2kd's registration (get_cfg, add_gfl_config, merge, build)."""
    from d2kd.export import student_config, student_state_dict

    cfg = distill_gfl_cfg(tmp_path, heads=["ld"])
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "distilled.pth")
    config = write_yaml(student_config(cfg), tmp_path / "student.yaml")
    plain_cfg = get_cfg()
    add_gfl_config(plain_cfg)
    plain_cfg.merge_from_file(config)
    plain = build_model(plain_cfg)
    assert type(plain).__name__ == "GFL"
    plain.load_state_dict(student_state_dict(str(tmp_path / "distilled.pth")))
    model.eval(), plain.eval()
    batch = random_batch(num_images=2)  # GN (32 groups of 1 channel) needs > 1 value at the 1x1 p7
    with torch.no_grad():
        a, b = model(batch)[0]["instances"], plain(batch)[0]["instances"]
    assert torch.allclose(a.scores, b.scores) and torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor)


@pytest.mark.parametrize("name", ["gfl_R_18_FPN_2k_shapes.yaml", "gfl_R_18_half_FPN_1k_shapes.yaml",
                                  "ld_gfl_R_18_half_FPN_1k_shapes.yaml"])
def test_shapes_gfl_configs_load(name):
    import os

    from d2kd.modeling.teacher import build_teacher_cfg

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "shapes", name))
    assert cfg.MODEL.GFL.NUM_CLASSES == 6 and cfg.MODEL.GFL.OCTAVE_BASE_SCALE == 8.0
    if name.startswith("ld_"):
        assert cfg.MODEL.META_ARCHITECTURE == "DistillGFL" and list(cfg.DISTILL.HEADS) == ["ld"]
        teacher = build_teacher_cfg(cfg)
        assert teacher.MODEL.META_ARCHITECTURE == "GFL" and teacher.MODEL.GFL.NUM_CLASSES == 6
    else:
        assert cfg.MODEL.META_ARCHITECTURE == "GFL"


def test_gfl_trains_on_the_built_in_data_is_coco_evaluated_and_exports_verified(tmp_path, shapes_cache):
    """The user's path for a GFL: train_net.py on the shapes config, detectron2's COCOEvaluator
    at the end, then tools/export_student.py --verify (a plain GFL that needs d2kd's
    registration, and says so)."""
    import os
    import re
    import subprocess
    import sys

    repo = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, D2KD_CACHE=str(shapes_cache), OMP_NUM_THREADS="1")
    config = os.path.join(repo, "configs", "shapes", "gfl_R_18_half_FPN_1k_shapes.yaml")
    out = tmp_path / "gfl"
    train = subprocess.run(
        [sys.executable, os.path.join(repo, "train_net.py"), "--config-file", config,
         "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "3",
         "OUTPUT_DIR", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-3000:]
    assert "COCOEvaluator" in log or "coco_evaluation" in log, log[-3000:]
    assert re.search(r"copypaste: AP,AP50,AP75,APs,APm,APl", log), log[-3000:]

    export = subprocess.run(
        [sys.executable, os.path.join(repo, "tools", "export_student.py"), "--config-file", config,
         "--weights", str(out / "model_final.pth"), "--output-dir", str(tmp_path / "release"), "--verify",
         "--num-images", "2", "MODEL.GFL.SCORE_THRESH_TEST", "0.0"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-3000:]
    assert "NEEDS: MODEL.META_ARCHITECTURE = GFL" in export.stdout
    assert "verified: detectron2 with d2kd" in export.stdout
    assert "no missing or unexpected keys" in export.stdout
    assert int(re.search(r"(\d+) detections", export.stdout).group(1)) > 0
