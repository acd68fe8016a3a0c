"""The baseline heads of issue 10: PKD, FGFI, DeFeat (with robust weights), RKD (with GK's
global relations), checked against direct formulas, and one training step each."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from torch import nn

from conftest import detector_cfg, distill_cfg, fake_context, random_batch, sampled_rois
from d2kd.engine.prototype_refresh import collect_instance_features, rebuild_bank
from d2kd.heads.defeat import DeFeatHead
from d2kd.heads.fgfi import FGFIHead, imitation_masks
from d2kd.heads.gk import GKHead
from d2kd.heads.pkd import PKDHead, pkd_loss
from d2kd.heads.rkd import RKDHead, rkd_angle_loss, rkd_distance_loss
from d2kd.prototypes import PrototypeBank, instance_features
from d2kd.structures import AnchorMatches


def head_cfg(arch="rcnn"):
    """A Distill* config for building heads directly (no teacher is needed for that)."""
    cfg = detector_cfg(arch)
    cfg.MODEL.META_ARCHITECTURE = "DistillRCNN" if arch == "rcnn" else "DistillRetinaNet"
    return cfg


def shapes(channels, strides=(8, 16)):
    return {s: ShapeSpec(channels=channels, stride=s) for s in strides}


def make_identity(adapters, channels):
    """Turn every adapter conv (1x1 or 3x3, no ReLU) into the identity map."""
    for module in adapters.adapters.values():
        conv = module[0] if isinstance(module, nn.Sequential) else module
        k = conv.kernel_size[0]
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :, k // 2, k // 2] = torch.eye(channels)
            conv.bias.zero_()


def gt(boxes, classes=None):
    inst = Instances((64, 80))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes if classes is not None else [0] * len(inst.gt_boxes), dtype=torch.long)
    return inst


# ---------------------------------------------------------------------------------- PKD
def _pearson_loss(s: np.ndarray, t: np.ndarray) -> float:
    """(n-1)/n * (1 - mean_c r_c), r_c numpy's Pearson correlation over (N, H, W)."""
    c = s.shape[1]
    r = [np.corrcoef(s[:, i].ravel(), t[:, i].ravel())[0, 1] for i in range(c)]
    n = s.shape[0] * s.shape[2] * s.shape[3]
    return (n - 1) / n * (1.0 - float(np.mean(r)))


def test_pkd_is_one_minus_mean_pearson_correlation():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    s = 0.7 * t + 0.5 * torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) + 3.0
    cfg = head_cfg()
    cfg.DISTILL.PKD.WEIGHT = 1.0
    head = PKDHead(cfg, shapes(5, (8,)), shapes(5, (8,)))
    assert len(head.adapters.adapters) == 0  # same channels: no adapter
    ctx = fake_context({8: s.float()}, {8: t.float()}, [gt([])] * 2, 3, strides=(8,))
    loss = head(ctx)["loss_distill_pkd"].item()
    expected = _pearson_loss(s.numpy(), t.numpy())
    assert loss == pytest.approx(expected, rel=1e-4)
    # with n = 84 cells per channel, (n-1)/n (unbiased std) is the only gap to 1 - mean r
    assert loss == pytest.approx(expected * 84 / 83, rel=2e-2)


def test_pkd_is_invariant_to_a_per_channel_affine_change_of_either_map():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 4, 5, 6, generator=g)
    s = t + torch.randn(2, 4, 5, 6, generator=g)
    scale = torch.tensor([0.1, 2.0, 7.0, 30.0])[None, :, None, None]
    shift = torch.tensor([-5.0, 0.0, 3.0, 100.0])[None, :, None, None]
    base = pkd_loss(s, t).item()
    assert pkd_loss(s * scale + shift, t).item() == pytest.approx(base, rel=1e-4)
    assert pkd_loss(s, t * scale - shift).item() == pytest.approx(base, rel=1e-4)
    assert pkd_loss(t * scale + shift, t).item() == pytest.approx(0.0, abs=1e-5)


def test_pkd_resizes_the_student_map_rather_than_cropping_it():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 3, 4, 5, generator=g, requires_grad=True)
    t = torch.randn(1, 3, 8, 10, generator=g)
    cfg = head_cfg()
    cfg.DISTILL.PKD.WEIGHT = 1.0
    head = PKDHead(cfg, shapes(3, (8,)), shapes(3, (8,)))
    ctx = fake_context({8: s}, {8: t}, [gt([])], 3, strides=(8,))
    loss = head(ctx)["loss_distill_pkd"]
    resized = F.interpolate(s.detach(), size=(8, 10), mode="bilinear", align_corners=False)
    assert loss.item() == pytest.approx(pkd_loss(resized, t).item(), rel=1e-6)
    assert loss.item() != pytest.approx(pkd_loss(s.detach(), t[..., :4, :5]).item(), rel=1e-3)  # not a crop
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_pkd_weight_follows_the_student_kind_unless_set_and_adapter_only_for_other_channels():
    both = shapes(16, (4, 8, 16, 32, 64)), shapes(32, (4, 8, 16, 32, 64))
    rcnn, retina = PKDHead(head_cfg("rcnn"), *both), PKDHead(head_cfg("retinanet"), *both)
    assert (rcnn.weight, retina.weight) == (6.0, 10.0)
    assert rcnn.strides == [4, 8, 16, 32]  # the four finest shared strides, as released
    assert sorted(rcnn.adapters.adapters) == ["s16", "s32", "s4", "s8"]
    assert rcnn.adapters.adapters["s4"].kernel_size == (1, 1)
    cfg = head_cfg("retinanet")
    cfg.DISTILL.PKD.WEIGHT = 2.5
    cfg.DISTILL.PKD.NUM_LEVELS = 0
    head = PKDHead(cfg, *both)
    assert head.weight == 2.5 and head.strides == [4, 8, 16, 32, 64]
    cfg.DISTILL.PKD.WEIGHT = -2.0
    with pytest.raises(ValueError, match="PKD.WEIGHT"):
        PKDHead(cfg, *both)


def test_heterogeneous_pair_pairs_pkd_by_stride(tmp_path, storage):
    # a Faster R-CNN teacher (p2-p6) teaches a RetinaNet student (p3-p7) on strides 8-64
    model = build_model(distill_cfg(tmp_path, "retinanet", "rcnn", heads=["pkd"]))
    head = model.distill_heads["pkd"]
    assert head.strides == [8, 16, 32, 64] and head.weight == 10.0
    model.train()
    losses = model(random_batch())
    assert torch.isfinite(losses["loss_distill_pkd"]) and losses["loss_distill_pkd"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


# --------------------------------------------------------------------------------- FGFI
FAR = [100.0, 100.0, 101.0, 101.0]


def _hand_made_anchors(gt_per_image):
    """Stride 8: a 2x3 map with A = 2 anchors per cell; stride 16: a 1x2 map with A = 1.

    Against g = [0, 0, 10, 10]: anchor (y0, x0, a0) has IoU 0.6, (y0, x1, a1) 0.4, (y1, x2, a1)
    is g itself; at stride 16, (y0, x0) has IoU 0.2 and (y0, x1) is g2 = [0, 0, 120, 120].
    Every other anchor is far away. Rows follow detectron2's (H, W, A) order.
    """
    s8 = [FAR] * 12
    s8[(0 * 3 + 0) * 2 + 0] = [0.0, 0.0, 10.0, 6.0]
    s8[(0 * 3 + 1) * 2 + 1] = [0.0, 0.0, 10.0, 4.0]
    s8[(1 * 3 + 2) * 2 + 1] = [0.0, 0.0, 10.0, 10.0]
    s16 = [[0.0, 0.0, 10.0, 2.0], [0.0, 0.0, 120.0, 120.0]]
    anchors = {8: Boxes(torch.tensor(s8)), 16: Boxes(torch.tensor(s16))}
    every = Boxes.cat([anchors[8], anchors[16]])
    ious = [pairwise_iou(g.gt_boxes, every) for g in gt_per_image]
    n, r = len(gt_per_image), len(every)
    zeros = torch.zeros(n, r, dtype=torch.long)
    return AnchorMatches([8, 16], [2, 1], anchors, ious, zeros, zeros.float(), zeros, num_classes=1)


def test_fgfi_mask_on_a_hand_made_anchor_set():
    # g (11 px), g2 (121 px, its own stride-16 anchor), nothing, and g3 = [0, 0, 120, 40]
    # (70 px: the authors' rule assigns it to stride 8, but its best anchor, IoU 1/3, is g2's)
    images = [gt([[0, 0, 10, 10], [0, 0, 120, 120]]), gt([]), gt([[0, 0, 120, 40]])]
    anchors = _hand_made_anchors(images)
    boxes = [g.gt_boxes.tensor for g in images]
    sizes = {8: (2, 3), 16: (1, 2)}
    near_g = [[True, False, False], [False, False, True]]  # g's anchors of IoU 1 and 0.6 > 0.5
    nothing8, nothing16 = [[False] * 3] * 2, [[False, False]]

    def masks(mode, psi=0.5):
        out = imitation_masks(anchors, boxes, sizes, psi, mode)
        return [(out[8][i].tolist(), out[16][i].tolist()) for i in range(3)]

    # the best over every anchor: each box marks only the level whose anchors fit it
    assert masks("all_levels") == [(near_g, [[False, True]]), (nothing8, nothing16), (nothing8, [[False, True]])]
    # per level: at stride 16 g's best is the IoU-0.2 anchor, so it marks that cell too; at
    # stride 8, g2 and g3 mark the two cells whose IoU passes half of their (tiny) best
    assert masks("each_level") == [(near_g, [[True, True]]), (nothing8, nothing16), (near_g, [[False, True]])]
    # only the assigned level: g and g3 at stride 8, g2 at stride 16
    assert masks("assigned_level") == [(near_g, [[False, True]]), (nothing8, nothing16), (near_g, nothing16)]
    # psi = 0.3 also lets g's IoU-0.4 anchor in
    assert masks("all_levels", 0.3)[0][0] == [[True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="max_iou_over"):
        masks("every")


def _fgfi_context(images, channels=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    s = {8: torch.randn(2, channels, 2, 3, generator=g), 16: torch.randn(2, channels, 1, 2, generator=g)}
    t = {k: v + torch.randn(v.shape, generator=g) for k, v in s.items()}
    s = {k: v.requires_grad_() for k, v in s.items()}
    ctx = fake_context(s, t, images, 1, strides=(8, 16))
    anchors = _hand_made_anchors(images)
    ctx._outputs.anchors = lambda: anchors
    return ctx, s, t


def test_fgfi_loss_is_the_masked_imitation_over_twice_the_mask_area():
    images = [gt([[0, 0, 10, 10], [0, 0, 120, 120]]), gt([])]
    ctx, s, t = _fgfi_context(images)
    cfg = head_cfg()
    cfg.DISTILL.FGFI.START_ITER = 0
    cfg.DISTILL.FGFI.ADAPTER_RELU = False
    head = FGFIHead(cfg, shapes(4), shapes(4))
    assert sorted(head.adapters.adapters) == ["s16", "s8"]  # always, even with equal channels
    make_identity(head.adapters, 4)
    loss = head(ctx)["loss_distill_fgfi"]
    masks = {
        8: torch.tensor([[[1.0, 0, 0], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]]),
        16: torch.tensor([[[0.0, 1]], [[0, 0]]]),
    }
    expected = sum(
        (((s[k].detach() - t[k]) ** 2).sum(1) * masks[k]).sum() / (2 * masks[k].sum()) for k in (8, 16)
    )
    assert loss.item() == pytest.approx(0.01 * expected.item(), rel=1e-5)


def test_fgfi_adapter_init_msra_or_the_authors_truncated_normal():
    cfg = head_cfg()
    msra = FGFIHead(cfg, shapes(64), shapes(64)).adapters.adapters["s8"][0]
    assert msra.weight.std().item() > 1e-2 and (msra.bias == 0).all()
    cfg.DISTILL.FGFI.ADAPTER_INIT = "trunc_normal"
    torch.manual_seed(0)
    conv = FGFIHead(cfg, shapes(64), shapes(64)).adapters.adapters["s8"][0]
    # FGFI's code: normal(0, 1e-4) cut at 2 std; the bias keeps PyTorch's default
    assert conv.weight.abs().max().item() <= 2e-4
    assert conv.weight.std().item() == pytest.approx(0.88e-4, rel=0.1)  # std of a 2-std truncated normal
    assert conv.bias.abs().max().item() > 1e-3
    cfg.DISTILL.FGFI.ADAPTER_INIT = "zeros"
    with pytest.raises(ValueError, match="DISTILL.FGFI.ADAPTER_INIT must be one of"):
        FGFIHead(cfg, shapes(4), shapes(4))


def test_fgfi_waits_for_its_start_iteration_without_running_the_teacher(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["fgfi"])
    assert cfg.DISTILL.FGFI.START_ITER == 400
    model = build_model(cfg)
    model.train()
    calls = []
    model.teacher.backbone.register_forward_hook(lambda *args: calls.append(1))
    with EventStorage(0):
        losses = model(random_batch())
    assert losses["loss_distill_fgfi"].item() == 0 and not calls
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.distill_heads.parameters())
    with EventStorage(400):
        losses = model(random_batch())
    assert losses["loss_distill_fgfi"].item() > 0 and calls


# ------------------------------------------------------------------------------- DeFeat
def _roi_context(num_classes=3, channels=4, seed=4):
    """Two images, RoIs with 2 foreground and 5 background rows in all, random logits."""
    g = torch.Generator().manual_seed(seed)
    images = [gt([[4, 4, 30, 28]], [1]), gt([[40, 8, 70, 50]], [2])]
    props = []
    for i, (labels, gt_index) in enumerate([([1, 3, 3, 3], [0, -1, -1, -1]), ([2, 3, 3], [0, -1, -1])]):
        p = Instances((64, 80))
        corners = torch.rand(len(labels), 2, generator=g).repeat(1, 2) * 30  # distinct boxes
        p.proposal_boxes = Boxes(corners + torch.tensor([0, 0, 8, 8.0]) + i)
        p.gt_classes = torch.tensor(labels)
        p.gt_index = torch.tensor(gt_index)
        props.append(p)
    s_logits = torch.randn(7, num_classes + 1, generator=g, requires_grad=True)
    t_logits = torch.randn(7, num_classes + 1, generator=g)
    feats = {s: torch.randn(2, channels, 64 // s, 80 // s, generator=g) for s in (8, 16)}
    ctx = fake_context(
        {s: f.clone().requires_grad_() for s, f in feats.items()},
        {s: f.clone() for s, f in feats.items()},
        images, num_classes, rois=sampled_rois(props, s_logits, num_classes), teacher_logits=t_logits,
    )
    return ctx, s_logits, t_logits


def _kl_rows(s_logits, t_logits, temperature):
    p_t = torch.softmax(t_logits.double() / temperature, 1).numpy()
    log_p_s = torch.log_softmax(s_logits.detach().double() / temperature, 1).numpy()
    return (p_t * (np.log(p_t) - log_p_s)).sum(1) * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_defeat_roi_kls_are_averaged_over_their_own_counts(temperature):
    ctx, s_logits, t_logits = _roi_context()
    cfg = head_cfg()
    cfg.DISTILL.DEFEAT.TEMPERATURE = temperature
    head = DeFeatHead(cfg, shapes(4), shapes(4))
    make_identity(head.adapters, 4)
    losses = head(ctx)
    kl = _kl_rows(s_logits, t_logits, temperature)
    fg = np.array([1, 0, 0, 0, 1, 0, 0], dtype=bool)
    assert losses["loss_distill_defeat_kl_fg"].item() == pytest.approx(2.0 * kl[fg].mean(), rel=1e-5)
    assert losses["loss_distill_defeat_kl_bg"].item() == pytest.approx(2.0 * kl[~fg].mean(), rel=1e-5)
    assert kl[fg].mean() + kl[~fg].mean() != pytest.approx(2 * kl.mean(), rel=1e-3)  # not one joint mean
    # identical features through an identity adapter: no feature loss
    assert losses["loss_distill_defeat_fg"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_distill_defeat_bg"].item() == pytest.approx(0.0, abs=1e-7)


def test_defeat_feature_terms_split_at_the_gt_boxes_assigned_levels():
    ctx, _, _ = _roi_context()
    outputs = ctx._outputs
    # both boxes are small (level index 0 of the student's [8, 16]): they cover stride-8 cells
    # x in [0, 3), y in [0, 3) (image 0) and x in [5, 8), y in [1, 6) (image 1)
    fg = torch.zeros(2, 8, 10, dtype=torch.bool)
    fg[0, 0:3, 0:3] = True
    fg[1, 1:6, 5:8] = True
    delta = torch.zeros(2, 4, 8, 10)
    delta[0, :, 0:3, 0:3] = 1.0  # foreground differences only, in image 0
    outputs.teacher_features[8] = outputs.teacher_features[8] + delta
    cfg = head_cfg()
    head = DeFeatHead(cfg, shapes(4), shapes(4))
    make_identity(head.adapters, 4)
    losses = head(ctx)
    # fg: sum over 9 cells x 4 channels of 1 / (2 * 4 * 24 covered cells), stride 16 adds 0; / 2 levels
    assert losses["loss_distill_defeat_fg"].item() == pytest.approx(3.0 * 36 / (2 * 4 * 24) / 2, rel=1e-5)
    assert losses["loss_distill_defeat_bg"].item() == pytest.approx(0.0, abs=1e-7)


def _built_bank(channels=4, num_classes=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    bank = PrototypeBank([8, 16], {8: channels, 16: channels}, {8: channels, 16: channels}, num_classes, 2)
    for s in (8, 16):
        for c in range(num_classes):
            bank.set_class(s, c, torch.randn(2, channels, generator=g), torch.randn(2, channels, generator=g))
    bank.num_builds += 1
    return bank


def test_defeat_robust_weights_are_gks_foreground_term():
    ctx, _, _ = _roi_context()
    for s, f in ctx._outputs.teacher_features.items():
        ctx._outputs.teacher_features[s] = f + torch.randn_like(f)
    ctx.prototype_bank = _built_bank()
    cfg = head_cfg()
    cfg.DISTILL.DEFEAT.ROBUST_WEIGHTS = True
    cfg.DISTILL.DEFEAT.FG_WEIGHT = 1.0
    cfg.DISTILL.GK.INSTANCES = "gt"
    robust = DeFeatHead(cfg, shapes(4), shapes(4))
    assert "prototypes" in robust.requires
    gk = GKHead(cfg, shapes(4), shapes(4))
    for h in (robust, gk):
        make_identity(h.adapters, 4)
    with EventStorage(0):
        gk_losses = gk(ctx)
    ours = robust(ctx)["loss_distill_defeat_fg"]
    assert ours.item() == pytest.approx(gk_losses["loss_distill_gk_fg"].item(), rel=1e-6)
    weights = ctx.cache["instances_gt"].weight
    assert (weights < 1).any()  # so the plain term differs
    cfg.DISTILL.DEFEAT.ROBUST_WEIGHTS = False
    plain = DeFeatHead(cfg, shapes(4), shapes(4))
    make_identity(plain.adapters, 4)
    assert plain(ctx)["loss_distill_defeat_fg"].item() != pytest.approx(ours.item(), rel=1e-3)


# ---------------------------------------------------------------------------------- RKD
def _huber(x):
    x = np.abs(x)
    return np.where(x < 1, 0.5 * x ** 2, x - 0.5)


def _direct_rkd(s: np.ndarray, t: np.ndarray):
    m = len(s)
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    d_s = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    d_t = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    distance = _huber(d_s / d_s.mean() - d_t / d_t.mean()).mean()

    def cos(x, i, j, k):  # angle at vertex j
        a, b = x[i] - x[j], x[k] - x[j]
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    triplets = [p for p in itertools.permutations(range(m), 3)]
    angle = np.mean([_huber(cos(s, *p) - cos(t, *p)) for p in triplets])
    return distance, angle


def test_rkd_distance_and_angle_terms_match_the_direct_formula():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    distance, angle = _direct_rkd(s.numpy(), t.numpy())
    assert rkd_distance_loss(s, t).item() == pytest.approx(distance, rel=1e-5)
    assert rkd_angle_loss(s, t).item() == pytest.approx(angle, rel=1e-5)
    # the relations of a similar (rotated and scaled) embedding are the same
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert rkd_distance_loss(3 * s @ q, s).item() == pytest.approx(0.0, abs=1e-10)
    assert rkd_angle_loss(3 * s @ q, s).item() == pytest.approx(0.0, abs=1e-10)


def test_rkd_head_relates_the_instances_of_each_level_with_finite_gradients():
    g = torch.Generator().manual_seed(7)
    # four small boxes (stride 8), one repeated (a zero distance), and two large ones alone at 16
    images = [gt([[0, 0, 20, 20], [30, 10, 50, 40], [30, 10, 50, 40], [200, 0, 330, 130]]),
              gt([[8, 30, 30, 60], [0, 0, 120, 120]])]
    s = {8: torch.randn(2, 6, 8, 10, generator=g), 16: torch.randn(2, 6, 4, 5, generator=g)}
    s = {k: v.requires_grad_() for k, v in s.items()}
    t = {8: torch.randn(2, 5, 8, 10, generator=g), 16: torch.randn(2, 5, 4, 5, generator=g)}
    ctx = fake_context(s, t, images, 1, strides=(8, 16))
    head = RKDHead(head_cfg(), shapes(6), shapes(5))
    assert not list(head.parameters())  # no adapter
    losses = head(ctx)
    boxes = torch.tensor([[0, 0, 20, 20], [30, 10, 50, 40], [30, 10, 50, 40], [8, 30, 30, 60.0]])
    batch = torch.tensor([0, 0, 0, 1])
    f_s = F.normalize(instance_features(s[8].detach(), boxes, batch, 8).double(), dim=1).numpy()
    f_t = F.normalize(instance_features(t[8], boxes, batch, 8).double(), dim=1).numpy()  # L2_NORM
    # the duplicate pair has zero distance in both spaces (no angle there): the distance term
    m = 4
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    d_s = np.array([np.linalg.norm(f_s[i] - f_s[j]) for i, j in pairs])
    d_t = np.array([np.linalg.norm(f_t[i] - f_t[j]) for i, j in pairs])
    expected = _huber(d_s / d_s.mean() - d_t / d_t.mean()).mean()
    # stride 16 has two instances: a distance term (always 0: one pair, normalised) and no angle
    assert losses["loss_distill_rkd_distance"].item() == pytest.approx(25 * expected, rel=1e-4)
    assert losses["loss_distill_rkd_angle"].item() > 0
    sum(losses.values()).backward()
    assert torch.isfinite(s[8].grad).all() and s[8].grad.abs().sum() > 0


def test_rkd_global_is_gks_global_term():
    ctx, _, _ = _roi_context()
    for s, f in ctx._outputs.teacher_features.items():
        ctx._outputs.teacher_features[s] = f + torch.randn_like(f)
    cfg = head_cfg()
    cfg.DISTILL.RKD.GLOBAL = True
    cfg.DISTILL.GK.INSTANCES = "gt"
    head, gk = RKDHead(cfg, shapes(4), shapes(4)), GKHead(cfg, shapes(4), shapes(4))
    assert "prototypes" in head.requires
    ctx.prototype_bank = PrototypeBank([8, 16], {8: 4, 16: 4}, {8: 4, 16: 4}, 3, 2)
    assert head(ctx)["loss_distill_rkd_global"].item() == 0.0  # before the first build
    ctx.cache.clear()
    ctx.prototype_bank = _built_bank()
    with EventStorage(0):
        expected = gk(ctx)["loss_distill_gk_global"].item()
    loss = head(ctx)["loss_distill_rkd_global"]
    assert set(head(ctx)) == {"loss_distill_rkd_global"}
    assert expected > 0 and loss.item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------- training steps
def _check_step(model, losses, keys):
    for key in keys:
        assert key in losses, key
    for name, value in losses.items():
        assert torch.isfinite(value), name
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    for p in model.distill_heads.parameters():  # the adapters train with the student
        assert p.grad is not None and torch.isfinite(p.grad).all()


STEP_KEYS = {
    "pkd": ["loss_distill_pkd"],
    "fgfi": ["loss_distill_fgfi"],
    "defeat": ["loss_distill_defeat_fg", "loss_distill_defeat_bg"],
    "rkd": ["loss_distill_rkd_distance", "loss_distill_rkd_angle"],
}


@pytest.mark.parametrize("arch", ["rcnn", "retinanet"])
@pytest.mark.parametrize("head", sorted(STEP_KEYS))
def test_one_training_step_per_head(tmp_path, storage, head, arch):
    cfg = distill_cfg(tmp_path, arch, arch, heads=[head])
    cfg.DISTILL.FGFI.START_ITER = 0
    model = build_model(cfg)
    model.train()
    losses = model(random_batch(empty_last=True))
    keys = STEP_KEYS[head] + (["loss_distill_defeat_kl_fg", "loss_distill_defeat_kl_bg"]
                              if head == "defeat" and arch == "rcnn" else [])
    _check_step(model, losses, keys)
    if head == "defeat" and arch == "retinanet":
        assert not any("kl" in k for k in losses)  # dense students: feature terms only
    assert losses[STEP_KEYS[head][0]].item() > 0


@pytest.mark.parametrize("arch", ["rcnn", "retinanet"])
def test_prototype_variants_train_a_step_after_a_build(tmp_path, storage, arch):
    cfg = distill_cfg(tmp_path, arch, arch, heads=["defeat", "kd", "rkd"])
    cfg.DISTILL.DEFEAT.ROBUST_WEIGHTS = True
    cfg.DISTILL.KD.ROBUST_WEIGHTS = True
    cfg.DISTILL.RKD.GLOBAL = True
    model = build_model(cfg)
    assert model.prototype_bank is not None
    model.train()
    features = collect_instance_features(model, [random_batch(4, seed=i) for i in range(4)], min_size=4)
    rebuild_bank(model.prototype_bank, features, alpha=10.0)
    losses = model(random_batch(empty_last=True))
    assert losses["loss_distill_rkd_global"].item() > 0
    _check_step(model, losses, ["loss_distill_defeat_fg", "loss_distill_kd", "loss_distill_rkd_global"])


def test_gk_and_pkd_train_together(tmp_path, storage):
    model = build_model(distill_cfg(tmp_path, heads=["gk", "pkd"]))
    model.train()
    losses = model(random_batch(empty_last=True))
    _check_step(model, losses, ["loss_distill_gk_fg", "loss_distill_gk_response", "loss_distill_pkd"])


def test_defeat_without_kl_lets_a_dense_teacher_teach_a_two_stage_student(tmp_path, storage):
    cfg = distill_cfg(tmp_path, "rcnn", "retinanet", heads=["defeat"])
    with pytest.raises(ValueError, match="defeat"):
        build_model(cfg)
    cfg.DISTILL.DEFEAT.KL_FG_WEIGHT = 0.0
    cfg.DISTILL.DEFEAT.KL_BG_WEIGHT = 0.0
    model = build_model(cfg)
    model.train()
    _check_step(model, model(random_batch()), ["loss_distill_defeat_fg"])
