"""CWD, MGD, FGD and FBKD (issue 18): each loss on inputs small enough to compute by hand,
FGD's masks on known boxes, zero losses where the models agree, gradients into the learnable
parts, the per-kind defaults, and two training iterations of every shipped shapes config."""
import math
import os

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn

from conftest import detector_cfg, distill_cfg, fake_context, random_batch, save_plain_model
from d2kd.config import load_config
from d2kd.heads.cwd import CWDHead, channel_wise_divergence
from d2kd.heads.fbkd import FBKDHead, NonLocal, attention_guided_loss, channel_attention, spatial_attention
from d2kd.heads.fgd import FGDHead, GcBlock, fgd_attention, fgd_attention_loss, fgd_feature_losses, fgd_masks
from d2kd.heads.mgd import MGDHead, mgd_loss, random_cell_mask
from d2kd.value_checks import InvalidValueError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "configs", "shapes")
ALL_STRIDES = (4, 8, 16, 32, 64)


def head_cfg(arch="rcnn"):
    """A Distill* config for building heads directly (no teacher is needed for that)."""
    cfg = detector_cfg(arch)
    cfg.MODEL.META_ARCHITECTURE = "DistillRCNN" if arch == "rcnn" else "DistillRetinaNet"
    return cfg


def shapes(channels, strides=(8,)):
    return {s: ShapeSpec(channels=channels, stride=s) for s in strides}


def gt(boxes, size=(32, 32)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.long)
    return inst


def context(student, teacher, boxes=None, stride=8):
    """A step with one stride's maps and, per image, the given GT boxes (none by default)."""
    n = teacher.shape[0]
    instances = [gt(b) for b in (boxes or [[] for _ in range(n)])]
    return fake_context({stride: student}, {stride: teacher}, instances, num_classes=1, strides=(stride,))


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# ------------------------------------------------------------------------------------ CWD
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_cwd_is_the_kl_of_spatial_softmaxes_on_a_2x2_map(tau):
    # teacher logits log(1..4): at tau 1 its distribution over the 4 cells is (.1, .2, .3, .4);
    # a constant student map is uniform over the cells at any tau
    teacher = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).view(1, 1, 2, 2)
    student = torch.zeros(1, 1, 2, 2)
    weights = [v ** (1 / tau) for v in (1, 2, 3, 4)]
    p_t = [v / sum(weights) for v in weights]
    expected = tau ** 2 * kl(p_t, [0.25] * 4)  # summed over the cells, not averaged
    assert channel_wise_divergence(student, teacher, tau).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_averages_over_images_and_channels_and_is_zero_for_equal_maps():
    teacher = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).view(1, 1, 2, 2)
    one = channel_wise_divergence(torch.zeros(1, 1, 2, 2), teacher, 1.0)
    # 2 images x 3 channels of the same pair: the same value (the sum is divided by N*C)
    many = channel_wise_divergence(torch.zeros(2, 3, 2, 2), teacher.expand(2, 3, 2, 2), 1.0)
    assert many.item() == pytest.approx(one.item(), rel=1e-6)
    x = torch.randn(2, 3, 4, 5)
    assert channel_wise_divergence(x, x, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    # a constant shift per channel does not change a softmax
    assert channel_wise_divergence(x + 3.0, x, 1.0).item() == pytest.approx(0.0, abs=1e-5)


def test_cwd_head_sums_strides_times_the_weight_and_adapts_only_other_channels():
    cfg = head_cfg()
    assert (cfg.DISTILL.CWD.WEIGHT, cfg.DISTILL.CWD.TEMPERATURE, list(cfg.DISTILL.CWD.STRIDES)) == (10.0, 1.0, [])
    head = CWDHead(cfg, shapes(3, (8, 16)), shapes(3, (8, 16)))
    assert head.strides == [8, 16] and len(list(head.parameters())) == 0
    s = {8: torch.randn(2, 3, 4, 4), 16: torch.randn(2, 3, 2, 2)}
    t = {8: torch.randn(2, 3, 4, 4), 16: torch.randn(2, 3, 2, 2)}
    ctx = fake_context(s, t, [gt([]), gt([])], num_classes=1, strides=(8, 16))
    expected = 10.0 * sum(channel_wise_divergence(s[k], t[k], 1.0) for k in (8, 16))
    assert head(ctx)["loss_distill_cwd"].item() == pytest.approx(expected.item(), rel=1e-5)
    adapted = CWDHead(cfg, shapes(3, (8, 16)), shapes(5, (8, 16)))
    assert 8 in adapted.adapters and 16 in adapted.adapters  # 1x1 convs map 3 -> 5 channels


# ------------------------------------------------------------------------------------ MGD
def test_mgd_mask_draws_one_value_per_cell_at_the_mask_ratio():
    like = torch.ones(2, 3, 100, 100)
    torch.manual_seed(0)
    mask = random_cell_mask(like, 0.45)
    assert mask.shape == (2, 1, 100, 100) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 1 - mask.mean().item() == pytest.approx(0.45, abs=0.02)
    assert random_cell_mask(like, 0.0).min() == 1 and random_cell_mask(like, 1.0).max() == 0


def test_mgd_loss_is_summed_over_channels_and_cells_and_averaged_over_images():
    generated = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    assert mgd_loss(generated, torch.zeros(2, 1, 2, 2)).item() == pytest.approx(1 + 4 + 9 + 16)


def _identity_generator(head, stride, channels):
    for conv in (head.generators[f"s{stride}"][0], head.generators[f"s{stride}"][2]):
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(channels)
            conv.bias.zero_()


def test_mgd_head_regenerates_from_the_masked_student_map():
    cfg = head_cfg()
    head = MGDHead(cfg, shapes(2), shapes(2))
    _identity_generator(head, 8, 2)
    student = torch.rand(2, 2, 3, 3)  # >= 0: the identity generator's ReLU keeps it
    teacher = torch.rand(2, 2, 3, 3)
    weight = cfg.DISTILL.MGD.TWO_STAGE.WEIGHT
    head.mask_ratio = 0.0  # nothing masked: G(F_s) = F_s
    expected = weight * ((student - teacher) ** 2).sum() / 2
    assert head(context(student, teacher))["loss_distill_mgd"].item() == pytest.approx(expected.item(), rel=1e-5)
    head.mask_ratio = 1.0  # everything masked: G(0) = 0 with zero biases
    expected = weight * (teacher ** 2).sum() / 2
    assert head(context(student, teacher))["loss_distill_mgd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mgd_defaults_follow_the_student_kind_and_the_generator_learns():
    five = shapes(4, ALL_STRIDES), shapes(8, ALL_STRIDES)
    two_stage = MGDHead(head_cfg("rcnn"), *five)
    dense = MGDHead(head_cfg("retinanet"), *five)
    assert (two_stage.weight, two_stage.mask_ratio, two_stage.strides) == (5e-7, 0.45, [4, 8, 16, 32])
    assert (dense.weight, dense.mask_ratio, dense.strides) == (2e-5, 0.65, list(ALL_STRIDES))
    assert 4 in two_stage.adapters  # 4 -> 8 channels
    loss = dense(fake_context({s: torch.randn(1, 4, 4, 4) for s in ALL_STRIDES},
                              {s: torch.randn(1, 8, 4, 4) for s in ALL_STRIDES}, [gt([])], 1, strides=ALL_STRIDES))
    loss["loss_distill_mgd"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dense.parameters())
    cfg = head_cfg()
    cfg.DISTILL.MGD.TWO_STAGE.MASK_RATIO = 1.5
    with pytest.raises(InvalidValueError, match="MASK_RATIO"):
        MGDHead(cfg, shapes(2), shapes(2))
    cfg = head_cfg()
    cfg.DISTILL.MGD.TWO_STAGE.WEIGHT = -1.0
    with pytest.raises(InvalidValueError, match="DISTILL.MGD.TWO_STAGE.WEIGHT"):
        MGDHead(cfg, shapes(2), shapes(2))


# ------------------------------------------------------------------------------------ FGD
def test_fgd_attention_on_a_2x2_map_and_two_channels():
    temperature = 0.5
    # |x| / T = log(1..4): the spatial softmax is (.1, .2, .3, .4), times H*W = 4
    x = (temperature * torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))).view(1, 1, 2, 2)
    spatial, channel = fgd_attention(-x, temperature)  # the attention reads |x|
    assert torch.allclose(spatial, torch.tensor([[0.4, 0.8], [1.2, 1.6]]).view(1, 2, 2), atol=1e-6)
    assert torch.allclose(channel, torch.ones(1, 1))  # one channel: C * softmax = 1
    # channel means 0 and T*log(3): softmax (1/4, 3/4), times C = 2
    two = torch.stack([torch.zeros(2, 2), torch.full((2, 2), temperature * math.log(3))]).unsqueeze(0)
    spatial, channel = fgd_attention(two, temperature)
    assert torch.allclose(channel, torch.tensor([[0.5, 1.5]]), atol=1e-6)
    assert torch.allclose(spatial, torch.ones(1, 2, 2))  # every cell the same


def test_fgd_masks_scale_by_box_area_and_normalise_the_background_by_its_count():
    # stride 4, an 8x8 map: box (4, 4, 12, 10) covers cells floor(1)..ceil(3) across and
    # floor(1)..ceil(2.5) down, ends included: 3 x 3 cells at 1/9
    fg, bg = fgd_masks([torch.tensor([[4.0, 4.0, 12.0, 10.0]]), torch.zeros(0, 4)], 4, (8, 8))
    expected = torch.zeros(8, 8)
    expected[1:4, 1:4] = 1 / 9
    assert torch.allclose(fg[0], expected)
    assert torch.allclose(bg[0], (expected == 0).float() / 55)
    assert fg[1].sum() == 0 and torch.allclose(bg[1], torch.full((8, 8), 1 / 64))
    # overlapping boxes: the smaller box's larger value wins where they overlap
    fg, _ = fgd_masks([torch.tensor([[4.0, 4.0, 12.0, 10.0], [8.0, 8.0, 12.0, 12.0]])], 4, (8, 8))
    assert fg[0, 2, 2].item() == pytest.approx(1 / 4) and fg[0, 1, 1].item() == pytest.approx(1 / 9)
    # a box reaching past the map keeps its full area count, as the authors' code
    fg, _ = fgd_masks([torch.tensor([[24.0, 24.0, 32.0, 32.0]])], 4, (8, 8))
    assert fg[0, 6:, 6:].eq(1 / 9).all() and fg[0].gt(0).sum() == 4


def test_fgd_masks_match_a_box_by_box_slicing_of_the_map_on_random_boxes():
    """The vectorised masks against the definition written out box by box: slice the cells
    floor(x1/s)..ceil(x2/s) (ends included, cut at the map), keep the larger value."""
    g = torch.Generator().manual_seed(0)
    stride, h, w = 8, 7, 9
    boxes = []
    for n in (5, 0, 3):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * stride, h * stride])
        wh = 1 + torch.rand(n, 2, generator=g) * 40  # some reach past the map
        boxes.append(torch.cat([xy, xy + wh], 1))
    fg, bg = fgd_masks(boxes, stride, (h, w))
    for i, b in enumerate(boxes):
        expected = torch.zeros(h, w)
        for x1, y1, x2, y2 in (b / stride).tolist():
            c0, c1, r0, r1 = math.floor(x1), math.ceil(x2), math.floor(y1), math.ceil(y2)
            value = 1.0 / ((r1 + 1 - r0) * (c1 + 1 - c0))
            expected[r0:r1 + 1, c0:c1 + 1] = expected[r0:r1 + 1, c0:c1 + 1].clamp(min=value)
        assert torch.allclose(fg[i], expected)
        free = expected == 0
        assert torch.allclose(bg[i], free.float() / max(int(free.sum()), 1))


def test_fgd_focal_terms_count_boxes_and_images_on_a_constant_map():
    # a constant teacher map has uniform attention (every A^S and A^C is 1); against a zero
    # student each cell's error is 1, so the foreground term is sum(M) / N = boxes / N and the
    # background term is 1 per image / N
    teacher = torch.ones(2, 1, 8, 8)
    student = torch.zeros(2, 1, 8, 8)
    fg, bg = fgd_masks([torch.tensor([[4.0, 4.0, 12.0, 10.0], [20.0, 20.0, 24.0, 24.0]]), torch.zeros(0, 4)], 4, (8, 8))
    spatial, channel = fgd_attention(teacher, 0.5)
    fg_loss, bg_loss = fgd_feature_losses(student, teacher, fg, bg, spatial, channel)
    assert fg_loss.item() == pytest.approx(2 / 2) and bg_loss.item() == pytest.approx(2 / 2)


def test_fgd_attention_loss_is_the_l1_of_both_attentions_over_images():
    spatial_t, channel_t = torch.tensor([[[0.4, 0.8], [1.2, 1.6]]]), torch.tensor([[0.5, 1.5]])
    loss = fgd_attention_loss(torch.ones(1, 2, 2), torch.ones(1, 2), spatial_t, channel_t)
    assert loss.item() == pytest.approx((0.5 + 0.5) + (0.6 + 0.2 + 0.2 + 0.6))


def test_gc_block_starts_as_the_identity_and_learns_its_context():
    block = GcBlock(4)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(block(x), x)
    assert block.transform[1].normalized_shape == (2, 1, 1)
    with torch.no_grad():
        block.transform[-1].weight.normal_()
    (block(x) ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_fgd_head_is_zero_for_equal_maps_and_trains_both_gc_blocks():
    cfg = head_cfg()
    head = FGDHead(cfg, shapes(4), shapes(4))
    assert len(head.adapters.adapters) == 0  # same channels: no align conv
    x = torch.randn(2, 4, 8, 8)
    boxes = [[[8.0, 8.0, 40.0, 30.0]], []]
    losses = head(context(x, x.clone(), boxes))
    assert set(losses) == {f"loss_distill_fgd_{k}" for k in ("fg", "bg", "attention", "global")}
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in losses.values())
    student = torch.randn(2, 4, 8, 8, requires_grad=True)
    losses = head(context(student, x, boxes))
    assert all(v.item() > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert student.grad is not None
    for blocks in (head.student_blocks, head.teacher_blocks):  # the last conv first (the rest is behind a zero conv)
        assert blocks["s8"].transform[-1].weight.grad.abs().sum() > 0


def test_fgd_head_terms_match_the_formulas_with_the_kind_weights():
    cfg = head_cfg("retinanet")
    head = FGDHead(cfg, shapes(3, ALL_STRIDES), shapes(3, ALL_STRIDES))
    assert head.strides == list(ALL_STRIDES)  # dense students: every shared level
    assert (head.fg_weight, head.bg_weight, head.attention_weight, head.global_weight) == (1e-3, 5e-4, 5e-4, 5e-6)
    assert FGDHead(head_cfg(), shapes(3, ALL_STRIDES), shapes(3, ALL_STRIDES)).strides == [4, 8, 16, 32]
    s, t = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    boxes = [[[8.0, 8.0, 30.0, 20.0]], [[0.0, 0.0, 47.0, 47.0]]]
    head = FGDHead(head_cfg("retinanet"), shapes(3), shapes(3))
    losses = head(context(s, t, boxes))
    spatial_t, channel_t = fgd_attention(t, 0.5)
    spatial_s, channel_s = fgd_attention(s, 0.5)
    fg, bg = fgd_masks([torch.tensor(b) for b in boxes], 8, (6, 6))
    fg_loss, bg_loss = fgd_feature_losses(s, t, fg, bg, spatial_t, channel_t)
    assert losses["loss_distill_fgd_fg"].item() == pytest.approx(1e-3 * fg_loss.item(), rel=1e-5)
    assert losses["loss_distill_fgd_bg"].item() == pytest.approx(5e-4 * bg_loss.item(), rel=1e-5)
    attention = fgd_attention_loss(spatial_s, channel_s, spatial_t, channel_t)
    assert losses["loss_distill_fgd_attention"].item() == pytest.approx(5e-4 * attention.item(), rel=1e-5)
    # both blocks are the identity at init: the global term is the plain squared error / N
    plain = ((s - t) ** 2).sum() / 2
    assert losses["loss_distill_fgd_global"].item() == pytest.approx(5e-6 * plain.item(), rel=1e-5)


# ----------------------------------------------------------------------------------- FBKD
def test_fbkd_attentions_on_a_2x2_map():
    x = (0.5 * torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))).view(1, 1, 2, 2)
    assert torch.allclose(spatial_attention(x, 0.5), torch.tensor([0.4, 0.8, 1.2, 1.6]).view(1, 1, 2, 2), atol=1e-6)
    two = torch.stack([torch.zeros(2, 2), torch.full((2, 2), 0.5 * math.log(3))]).unsqueeze(0)
    assert torch.allclose(channel_attention(two, 0.5), torch.tensor([0.5, 1.5]).view(1, 2, 1, 1), atol=1e-6)


def test_fbkd_feature_term_is_a_norm_not_its_square():
    teacher = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    student = torch.zeros(1, 1, 1, 2, requires_grad=True)
    assert attention_guided_loss(student, teacher, torch.ones(1, 1, 1, 2)).item() == pytest.approx(5.0)
    assert attention_guided_loss(student, teacher, torch.full((1, 1, 1, 2), 4.0)).item() == pytest.approx(10.0)
    same = attention_guided_loss(teacher.clone().requires_grad_(), teacher, torch.ones(1, 1, 1, 2))
    same.backward()  # the gradient of the norm at 0 stays finite (no NaN from a sqrt)
    assert same.item() == 0


def test_non_local_block_starts_as_the_identity_and_pools_even_a_one_cell_map():
    block = NonLocal(8, 2, 8)
    for size in ((16, 16), (1, 1), (3, 5)):
        x = torch.randn(2, 8, *size)
        assert torch.equal(block(x), x)
    with torch.no_grad():
        block.out[1].weight.fill_(1.0)
    x = torch.randn(2, 8, 16, 16)
    y = block(x)
    # by hand: f = theta^T phi / P over the 2x2 cells of the 8x8-pooled phi and g maps
    theta = block.theta(x).flatten(2).transpose(1, 2)
    phi = nn.functional.max_pool2d(block.phi(x), 8).flatten(2)
    g = nn.functional.max_pool2d(block.g(x), 8).flatten(2).transpose(1, 2)
    inner = (theta @ phi / 4 @ g).transpose(1, 2).reshape(2, 2, 16, 16)
    assert torch.allclose(y, x + block.out(inner), atol=1e-5)


def _identity(conv_or_linear, channels):
    with torch.no_grad():
        w = conv_or_linear.weight
        w.zero_()
        if w.dim() == 2:
            w.copy_(torch.eye(channels))
        else:
            w[:, :, w.shape[2] // 2, w.shape[3] // 2] = torch.eye(channels) if w.shape[0] > 1 else 1.0
        conv_or_linear.bias.zero_()


def test_fbkd_head_is_zero_when_the_student_is_the_teacher_through_identity_adapters():
    cfg = head_cfg()
    head = FBKDHead(cfg, shapes(4), shapes(4))
    level = head.levels["s8"]
    for module in (level.feature, level.channel, level.non_local_adapter):
        _identity(module, 4)
    _identity(level.spatial, 1)
    x = torch.randn(2, 4, 8, 8)
    losses = head(context(x.clone().requires_grad_(), x))
    assert set(losses) == {f"loss_distill_fbkd_{k}" for k in ("feature", "channel", "spatial", "nonlocal")}
    assert all(v.item() == pytest.approx(0.0, abs=1e-5) for v in losses.values())


def test_fbkd_head_terms_weights_and_gradients():
    cfg = head_cfg()
    node = cfg.DISTILL.FBKD
    assert (node.FEATURE_WEIGHT, node.CHANNEL_WEIGHT, node.SPATIAL_WEIGHT, node.NONLOCAL_WEIGHT) == (7e-5, 4e-3, 4e-3, 7e-5)
    head = FBKDHead(cfg, shapes(4, ALL_STRIDES), shapes(6, ALL_STRIDES))
    assert head.strides == list(ALL_STRIDES)  # the release distils P2-P6
    assert (head.levels["s4"].student_non_local.inter, head.levels["s4"].student_non_local.pool) == (1, 8)
    assert (head.levels["s64"].teacher_non_local.inter, head.levels["s64"].teacher_non_local.pool) == (3, 2)
    for level in head.levels.values():  # let the non-local blocks' outputs reach the loss
        for block in (level.student_non_local, level.teacher_non_local):
            with torch.no_grad():
                block.out[1].weight.fill_(0.5)
    s = {k: torch.randn(2, 4, max(16 // (k // 4), 1), max(16 // (k // 4), 1), requires_grad=True) for k in ALL_STRIDES}
    t = {k: torch.randn(2, 6, *s[k].shape[-2:]) for k in ALL_STRIDES}
    losses = head(fake_context(s, t, [gt([]), gt([])], 1, strides=ALL_STRIDES))
    level = head.levels["s8"]
    mask = (spatial_attention(t[8], 0.5) + spatial_attention(s[8], 0.5)) / 2
    feature = attention_guided_loss(level.feature(s[8]), t[8], mask)
    channel = torch.dist(t[8].mean(dim=(2, 3)), level.channel(s[8].mean(dim=(2, 3))))
    assert feature.item() > 0 and channel.item() > 0
    sum(losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.levels["s8"].teacher_non_local.theta.weight.grad.abs().sum() > 0
    # the per-stride pieces add up
    single = FBKDHead(cfg, shapes(4), shapes(6))
    single.levels["s8"].load_state_dict(level.state_dict())
    one = single(context(s[8], t[8]))
    assert one["loss_distill_fbkd_feature"].item() == pytest.approx(7e-5 * feature.item(), rel=1e-5)
    assert one["loss_distill_fbkd_channel"].item() == pytest.approx(4e-3 * channel.item(), rel=1e-5)


def test_fbkd_channel_mask_weights_the_feature_term_by_the_mean_channel_attention():
    cfg = head_cfg()
    cfg.DISTILL.FBKD.CHANNEL_MASK = True
    head = FBKDHead(cfg, shapes(3), shapes(3))
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    spatial = (spatial_attention(t, 0.5) + spatial_attention(s, 0.5)) / 2
    channel = (channel_attention(t, 0.5) + channel_attention(s, 0.5)) / 2
    expected = 7e-5 * attention_guided_loss(head.levels["s8"].feature(s), t, spatial * channel)
    assert head(context(s, t))["loss_distill_fbkd_feature"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="CHANNEL_MASK"):
        FBKDHead(cfg, shapes(3), shapes(5))


# ----------------------------------------------------------------------------- training
STEP_KEYS = {
    "cwd": ["loss_distill_cwd"],
    "mgd": ["loss_distill_mgd"],
    "fgd": [f"loss_distill_fgd_{k}" for k in ("fg", "bg", "attention", "global")],
    "fbkd": [f"loss_distill_fbkd_{k}" for k in ("feature", "channel", "spatial", "nonlocal")],
}


@pytest.mark.parametrize("arch", ["rcnn", "retinanet"])
@pytest.mark.parametrize("head", sorted(STEP_KEYS))
def test_one_training_step_per_head(tmp_path, storage, head, arch):
    model = build_model(distill_cfg(tmp_path, arch, arch, heads=[head]))
    model.train()
    losses = model(random_batch(empty_last=True))
    for key in STEP_KEYS[head]:
        assert torch.isfinite(losses[key]) and losses[key].item() > 0, key
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    for name, p in model.distill_heads.named_parameters():  # every learnable part is in the graph
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_the_four_heads_return_finite_float32_losses_under_cpu_bfloat16_autocast(tmp_path, storage):
    model = build_model(distill_cfg(tmp_path, heads=sorted(STEP_KEYS)))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(random_batch())
    for key in sum(STEP_KEYS.values(), []):
        assert losses[key].dtype == torch.float32 and torch.isfinite(losses[key]), key
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.distill_heads.parameters())


def test_the_four_heads_train_together_on_a_faster_teacher_and_a_retinanet_student(tmp_path, storage):
    """Levels paired by stride: the teacher's p2-p6 and the student's p3-p7 share 8-64; FGD and
    MGD take every shared stride for a dense student."""
    model = build_model(distill_cfg(tmp_path, "retinanet", "rcnn", heads=sorted(STEP_KEYS)))
    assert model.distill_heads["fgd"].strides == model.distill_heads["mgd"].strides == [8, 16, 32, 64]
    model.train()
    losses = model(random_batch())
    for key in sum(STEP_KEYS.values(), []):
        assert torch.isfinite(losses[key]) and losses[key].item() > 0, key
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.distill_heads.parameters())


def test_coco_configs_run_the_released_settings_and_shapes_configs_rescale_them_as_their_comments_say():
    def cfg(*parts):
        return load_config(os.path.join(REPO, "configs", *parts))

    for arch, kind in (("faster_rcnn", "TWO_STAGE"), ("retinanet", "DENSE")):
        coco = {m: cfg(f"{m}_{arch}_R_50_FPN_2x_coco.yaml") for m in ("cwd", "mgd", "fgd")}
        assert (coco["cwd"].DISTILL.CWD.WEIGHT, coco["cwd"].DISTILL.CWD.TEMPERATURE) == (10.0, 1.0)
        mgd, fgd = coco["mgd"].DISTILL.MGD[kind], coco["fgd"].DISTILL.FGD[kind]
        assert (mgd.WEIGHT, mgd.MASK_RATIO) == {"TWO_STAGE": (5e-7, 0.45), "DENSE": (2e-5, 0.65)}[kind]
        released = {"TWO_STAGE": (5e-5, 2.5e-5, 5e-5, 5e-7), "DENSE": (1e-3, 5e-4, 5e-4, 5e-6)}[kind]
        assert (fgd.FG_WEIGHT, fgd.BG_WEIGHT, fgd.ATTENTION_WEIGHT, fgd.GLOBAL_WEIGHT) == released
        # the shapes configs: sums over every element x (COCO's / these maps' element count),
        # rounded (212 -> 200 two-stage, 53 -> 50 dense), sums over channels x 4
        elements = {"TWO_STAGE": 200, "DENSE": 50}[kind]
        shapes = {m: cfg("shapes", f"{m}_{arch}_R_18_half_FPN_1k_shapes.yaml") for m in ("cwd", "mgd", "fgd")}
        assert shapes["cwd"].DISTILL.CWD.WEIGHT == 10.0
        assert shapes["mgd"].DISTILL.MGD[kind].WEIGHT == pytest.approx(mgd.WEIGHT * elements)
        assert shapes["mgd"].DISTILL.MGD[kind].MASK_RATIO == mgd.MASK_RATIO
        small = shapes["fgd"].DISTILL.FGD[kind]
        assert (small.FG_WEIGHT, small.BG_WEIGHT, small.ATTENTION_WEIGHT, small.GLOBAL_WEIGHT) == pytest.approx(
            (released[0] * 4, released[1] * 4, released[2], released[3] * elements))
    coco, small = cfg("fbkd_faster_rcnn_R_50_FPN_2x_coco.yaml").DISTILL.FBKD, cfg(
        "shapes", "fbkd_faster_rcnn_R_18_half_FPN_1k_shapes.yaml").DISTILL.FBKD
    keys = ("FEATURE_WEIGHT", "CHANNEL_WEIGHT", "SPATIAL_WEIGHT", "NONLOCAL_WEIGHT")
    assert tuple(coco[k] for k in keys) == (7e-5, 4e-3, 4e-3, 7e-5)
    # norms: x the square root of the element ratio (212 -> 14; channels 4 -> 2; cells 53 -> 7)
    assert tuple(small[k] for k in keys) == pytest.approx((7e-5 * 14, 4e-3 * 2, 4e-3 * 7, 7e-5 * 14))


SHAPES_CONFIGS = [f"{m}_faster_rcnn_R_18_half_FPN_1k_shapes.yaml" for m in ("cwd", "fbkd", "fgd", "mgd")] + [
    f"{m}_retinanet_R_18_half_FPN_1k_shapes.yaml" for m in ("cwd", "fgd", "mgd")
]


@pytest.mark.parametrize("name", SHAPES_CONFIGS)
def test_each_shapes_config_trains_two_iterations(name, tmp_path, shapes_cache):
    """The shipped config as the benchmark runs it (a random teacher of its teacher config in
    place of the trained one), two iterations of two images."""
    from d2kd.engine import DistillTrainer
    from d2kd.modeling.teacher import build_teacher_cfg

    cfg = load_config(os.path.join(SHAPES, name))
    cfg.defrost()
    weights = str(tmp_path / "teacher.pth")
    save_plain_model(build_teacher_cfg(cfg), weights, seed=1)
    cfg.DISTILL.TEACHER.WEIGHTS = weights
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    method = name.split("_")[0]
    history = trainer.storage.histories()
    for key in STEP_KEYS[method]:
        assert key in history and math.isfinite(history[key].latest()), key
