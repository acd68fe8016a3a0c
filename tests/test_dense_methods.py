"""CrossKD and BCKD: their losses on hand-computable inputs, the context's dense-head towers
and cross head (``head_tower``, ``teacher_head_from``) against the heads applied by hand, and
two training iterations of each shapes config."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from conftest import detector_cfg, distill_cfg, random_batch, save_plain_model, write_yaml
from d2kd.config import load_config
from d2kd.heads import DISTILL_HEAD_REGISTRY, DistillHead
from d2kd.heads.bckd import BCKDHead, DenseBoxDecoder, binary_kd_loss
from d2kd.heads.crosskd import CrossKDHead, align_scale
from d2kd.structures import STUDENT, TEACHER, AnchorMatches, DenseOutputs, DistillContext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- helpers
def gfl_cfg(fpn_channels=32, num_classes=3, num_convs=2):
    cfg = detector_cfg("retinanet", fpn_channels, num_classes=num_classes)
    cfg.MODEL.META_ARCHITECTURE = "GFL"
    cfg.MODEL.GFL.NUM_CLASSES = num_classes
    cfg.MODEL.GFL.NUM_CONVS = num_convs
    return cfg


def distill_gfl_cfg(tmp_path, heads, student_channels=32, teacher_channels=64):
    teacher = gfl_cfg(teacher_channels)
    t_yaml = write_yaml(teacher, tmp_path / f"teacher_gfl_{teacher_channels}.yaml")
    t_weights = str(tmp_path / f"teacher_gfl_{teacher_channels}.pth")
    save_plain_model(teacher, t_weights, seed=1)
    cfg = gfl_cfg(student_channels)
    cfg.MODEL.META_ARCHITECTURE = "DistillGFL"
    cfg.DISTILL.TEACHER.CONFIG_FILE = t_yaml
    cfg.DISTILL.TEACHER.WEIGHTS = t_weights
    cfg.DISTILL.HEADS = list(heads)
    return cfg


def retinanet_pair(tmp_path, heads, student_channels=16, teacher_channels=32, num_convs=2, norm=""):
    """A tiny DistillRetinaNet pair whose towers have ``num_convs`` blocks."""
    teacher = detector_cfg("retinanet", teacher_channels)
    teacher.MODEL.RETINANET.NUM_CONVS = num_convs
    teacher.MODEL.RETINANET.NORM = norm
    t_yaml = write_yaml(teacher, tmp_path / f"teacher_rn_{teacher_channels}_{num_convs}_{norm}.yaml")
    t_weights = str(tmp_path / f"teacher_rn_{teacher_channels}_{num_convs}_{norm}.pth")
    save_plain_model(teacher, t_weights, seed=1)
    cfg = distill_cfg(tmp_path, "retinanet", "retinanet", heads=heads, student_channels=student_channels)
    cfg.MODEL.RETINANET.NUM_CONVS = num_convs
    cfg.MODEL.RETINANET.NORM = norm
    cfg.DISTILL.TEACHER.CONFIG_FILE = t_yaml
    cfg.DISTILL.TEACHER.WEIGHTS = t_weights
    return cfg


@DISTILL_HEAD_REGISTRY.register()
class TowerProbeHead(DistillHead):
    """Keeps the step's context; its loss is the sum of the cross-head class logits computed
    from the student's tower at ``LAYER`` (widths must match: no adapter here)."""

    requires = frozenset({"student.head_tower", "teacher.head_tower", "teacher.cross_head", "teacher.dense"})
    tower_layers = frozenset({0, 1, 2})
    last = None

    def forward(self, ctx):
        TowerProbeHead.last = ctx
        cross = ctx.teacher_head_from(ctx.head_tower(STUDENT, 1))
        return {self.loss_key(): cross.concat(0).sum() + cross.concat(1).sum()}


def one_step(cfg, model=None):
    model = model or build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(random_batch(empty_last=True))
    return model, losses


# ---------------------------------------------------------------- the loss pieces by hand
def test_binary_kd_by_hand_and_zero_where_the_student_is_the_teacher():
    z_s = torch.tensor([[0.0, 0.0]])
    z_t = torch.tensor([[math.log(3.0), 0.0]])  # sigmoid 0.75 and 0.5
    loss = binary_kd_loss(z_s, z_t, beta=1.0)
    # BCE(0.5, 0.75) = log 2, |0.5 - 0.75| = 0.25; the second class agrees: 0
    assert torch.allclose(loss, torch.tensor([[0.25 * math.log(2.0), 0.0]]), atol=1e-6)
    assert torch.allclose(binary_kd_loss(z_s, z_t, beta=2.0)[0, 0], torch.tensor(0.0625 * math.log(2.0)))
    z = torch.randn(5, 4)
    assert binary_kd_loss(z, z.clone()).abs().max() == 0


def test_binary_kd_gradient_points_the_student_to_the_teacher():
    z_s = torch.zeros(1, 1, requires_grad=True)
    binary_kd_loss(z_s, torch.tensor([[2.0]])).sum().backward()
    assert z_s.grad.item() < 0  # raising the logit lowers the loss


def test_align_scale_gives_the_teacher_channel_statistics():
    student = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)
    teacher = torch.tensor([10.0, 14.0]).reshape(1, 1, 1, 2)
    # (x - 1) / sqrt(2) * sqrt(8) + 12: the unbiased std of [0, 2] is sqrt(2), of [10, 14] sqrt(8)
    assert torch.allclose(align_scale(student, teacher), teacher, atol=1e-4)
    s, t = torch.randn(2, 3, 4, 5) * 3 + 1, torch.randn(2, 3, 4, 5) * 0.5 - 2
    out = align_scale(s, t)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), t.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(out.std(dim=(0, 2, 3)), t.std(dim=(0, 2, 3)), atol=1e-4)


def one_level_anchors(boxes, stride=8, labels=None, num_classes=1):
    boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    n = len(boxes)
    labels = torch.zeros(1, n, dtype=torch.long) if labels is None else torch.tensor([labels])
    return AnchorMatches(strides=[stride], num_anchors=[1], anchors={stride: boxes}, ious=[torch.zeros(1, n)],
                         matched_gt=torch.zeros(1, n, dtype=torch.long), matched_iou=torch.zeros(1, n),
                         labels=labels, num_classes=num_classes)


def test_box_decoder_distributions_and_deltas():
    anchors = one_level_anchors([[0.0, 0.0, 16.0, 16.0]], stride=8)
    cfg = detector_cfg("retinanet")
    logits = torch.full((1, 1, 4 * 3), -30.0)
    logits[..., 1::3] = 30.0  # every edge all at bin 1: 1 stride (8 px) from the centre (8, 8)
    assert torch.allclose(DenseBoxDecoder(cfg, True)(logits, anchors), torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]))
    deltas = torch.zeros(1, 1, 4)
    assert torch.allclose(DenseBoxDecoder(cfg, False)(deltas, anchors), torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]))


class FakeDenseStep:
    def __init__(self, dense_s, dense_t, anchors):
        self._dense = {STUDENT: dense_s, TEACHER: dense_t}
        self._anchors = anchors
        self.common_strides = [8]
        self.device = torch.device("cpu")

    def dense(self, side):
        return self._dense[side]

    def anchors(self):
        return self._anchors


def dense(cls, box, stride=8):
    """(R, C) logits and (R, K) box outputs of one image on a 1 x R map, one anchor per cell."""
    return DenseOutputs(strides=[stride], num_anchors=[1],
                        branches=[{stride: cls.t()[None, :, None, :]}, {stride: box.t()[None, :, None, :]}])


def test_bckd_head_by_hand_on_retinanet_deltas():
    cfg = detector_cfg("retinanet")
    cfg.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
    head = BCKDHead(cfg, {}, {})
    anchors = one_level_anchors([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32]], labels=[0, 1, -1])
    cls_s = torch.tensor([[0.0], [0.0], [0.0]])
    cls_t = torch.tensor([[math.log(3.0)], [0.0], [5.0]])  # the third anchor is ignored
    box_s = torch.zeros(3, 4)
    box_t = torch.tensor([[0.0, 0.0, math.log(2.0), 0.0], [1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    ctx = DistillContext(FakeDenseStep(dense(cls_s, box_s), dense(cls_t, box_t), anchors), [None], 1, [8])
    losses = head(ctx)
    # one positive anchor: the normaliser is 1. Class: only anchor 0 disagrees
    assert torch.allclose(losses["loss_distill_bckd_cls"], torch.tensor(0.25 * math.log(2.0)), atol=1e-6)
    # localisation: weight |0.75 - 0.5| = 0.25 on anchor 0 (anchor 1 agrees on its class: weight 0);
    # the teacher's box there is twice as wide around the same centre: IoU = GIoU = 1/2
    assert torch.allclose(losses["loss_distill_bckd_loc"], torch.tensor(4.0 * 0.25 * 0.5), atol=1e-5)
    same = DistillContext(FakeDenseStep(dense(cls_t, box_t), dense(cls_t, box_t), anchors), [None], 1, [8])
    assert all(v.abs().item() < 1e-6 for v in head(same).values())


def test_crosskd_box_kl_is_the_teacher_confidence_weighted_edge_kl():
    """The GFL box term on hand-made cross and teacher distributions (the cross head stubbed)."""
    cfg = gfl_cfg(32)
    cfg.MODEL.META_ARCHITECTURE = "DistillGFL"
    shapes = {8: ShapeSpec(channels=32, stride=8)}
    head = CrossKDHead(cfg, shapes, shapes)
    assert head.box_loss == "kl" and head.box_weight == 4.0 and not len(head.adapters)
    anchors = one_level_anchors([[0, 0, 16, 16], [16, 0, 32, 16]], labels=[0, 1])  # 1 class: label 1 = bg
    cls_t = torch.tensor([[0.0], [math.log(3.0)]])  # confidence 0.5 and 0.75
    box_t = torch.zeros(2, 8)  # 2 bins per edge, uniform
    box_c = torch.zeros(2, 8)
    box_c[1, 0] = math.log(3.0)  # one edge of anchor 1 at (0.75, 0.25)
    cross = dense(cls_t, box_c)
    head.cross_inputs = lambda ctx: None
    step = FakeDenseStep(None, dense(cls_t, box_t), anchors)
    step.teacher_head_from = lambda tower: cross
    ctx = DistillContext(step, [None], 1, [8])
    losses = head(ctx)
    assert losses["loss_distill_crosskd_cls"].abs().item() < 1e-7  # the cross logits are the teacher's
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    expected = 4.0 * (0.75 * kl / 4) / (0.5 + 0.75)
    assert torch.allclose(losses["loss_distill_crosskd_box"], torch.tensor(expected), atol=1e-6)


def test_crosskd_giou_box_term_on_retinanet_by_hand():
    """The RetinaNet box term: GIoU of the decoded cross boxes against the teacher's, weighted by
    the teacher's confidence, ignored anchors left out, / positives (the cross head stubbed)."""
    cfg = detector_cfg("retinanet")
    cfg.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
    shapes = {8: ShapeSpec(channels=16, stride=8)}
    head = CrossKDHead(cfg, shapes, shapes)
    assert head.box_loss == "giou" and head.box_weight == 1.0
    anchors = one_level_anchors([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32]], labels=[0, 1, -1])
    cls_t = torch.tensor([[math.log(3.0)], [0.0], [5.0]])  # confidence 0.75, 0.5; the third is ignored
    box_t = torch.zeros(3, 4)
    box_c = torch.tensor([[0.0, 0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0, 0.0], [9.0, 0, 0, 0]])
    cross = dense(cls_t, box_c)
    head.cross_inputs = lambda ctx: None
    step = FakeDenseStep(None, dense(cls_t, box_t), anchors)
    step.teacher_head_from = lambda tower: cross
    losses = head(DistillContext(step, [None], 1, [8]))
    # anchor 0: the cross box twice as wide about the same centre, GIoU 1/2, weight 0.75; anchor 1
    # agrees; one positive
    assert torch.allclose(losses["loss_distill_crosskd_box"], torch.tensor(0.75 * 0.5), atol=1e-5)
    assert losses["loss_distill_crosskd_cls"].abs().item() < 1e-7


# ---------------------------------------------------------------- the context: towers and cross head
@pytest.mark.parametrize("norm", ["", "BN"])
def test_teacher_head_from_any_layer_of_its_own_tower_reproduces_its_predictions(tmp_path, norm):
    cfg = retinanet_pair(tmp_path, ["towerprobe"], student_channels=32, teacher_channels=32, norm=norm)
    one_step(cfg)
    ctx = TowerProbeHead.last
    teacher = ctx.dense(TEACHER)
    for layer in (0, 1, 2):
        again = ctx.teacher_head_from(ctx.head_tower(TEACHER, layer))
        for b in (0, 1):
            for s in teacher.strides:
                assert torch.allclose(again.branches[b][s], teacher.branches[b][s], atol=1e-5)


def test_cross_predictions_are_the_teacher_head_applied_by_hand_to_the_student_tower(tmp_path):
    model, losses = one_step(retinanet_pair(tmp_path, ["towerprobe"], student_channels=32, teacher_channels=32))
    ctx = TowerProbeHead.last
    student, teacher = model, model.teacher
    tower = ctx.head_tower(STUDENT, 1)
    features = ctx.student_features
    cross = ctx.teacher_head_from(tower)
    for s in tower.strides:
        # the student's tower output at layer 1: its first conv, before the ReLU
        assert torch.allclose(tower.branches[0][s], student.head.cls_subnet[0](features[s]), atol=1e-6)
        assert torch.allclose(tower.branches[1][s], student.head.bbox_subnet[0](features[s]), atol=1e-6)
        with torch.no_grad():
            cls = teacher.head.cls_score(F.relu(teacher.head.cls_subnet[2](F.relu(tower.branches[0][s]))))
            box = teacher.head.bbox_pred(F.relu(teacher.head.bbox_subnet[2](F.relu(tower.branches[1][s]))))
        assert torch.allclose(cross.branches[0][s], cls, atol=1e-6)
        assert torch.allclose(cross.branches[1][s], box, atol=1e-6)

    # the cross loss alone: gradients reach the student's tower, not its predictors (the cross head
    # replaces them), and never the teacher
    losses["loss_distill_towerprobe"].backward()
    assert student.head.cls_subnet[0].weight.grad.abs().sum() > 0
    assert student.head.bbox_subnet[0].weight.grad.abs().sum() > 0
    assert student.backbone.fpn_output3.weight.grad.abs().sum() > 0
    assert student.head.cls_score.weight.grad is None and student.head.bbox_pred.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_gfl_cross_head_applies_the_teacher_scales(tmp_path):
    cfg = distill_gfl_cfg(tmp_path, ["towerprobe"], student_channels=32, teacher_channels=32)
    model = build_model(cfg)
    scales = model.teacher.head.scales
    with torch.no_grad():
        scales.copy_(torch.linspace(0.5, 3.0, len(scales)))
    one_step(cfg, model)
    ctx = TowerProbeHead.last
    teacher = ctx.dense(TEACHER)
    again = ctx.teacher_head_from(ctx.head_tower(TEACHER, 1))
    for s in teacher.strides:
        assert torch.allclose(again.branches[1][s], teacher.branches[1][s], atol=1e-5)


def test_under_autocast_the_cross_head_runs_in_the_students_precision_and_losses_are_float32(tmp_path):
    """CPU bfloat16 autocast (SOLVER.AMP on CPU): the heads run with autocast off, but the
    teacher's layers on the student's tower re-enter the student's autocast state, as every
    teacher pass; CrossKD's losses stay float32 and finite."""
    cfg = retinanet_pair(tmp_path, ["towerprobe", "crosskd"], student_channels=32, teacher_channels=32)
    cfg.DISTILL.CROSSKD.LAYER = 1
    model = build_model(cfg)
    model.train()
    with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(random_batch())
    assert losses["loss_distill_towerprobe"].dtype == torch.bfloat16
    for key in ("loss_distill_crosskd_cls", "loss_distill_crosskd_box"):
        assert losses[key].dtype == torch.float32 and torch.isfinite(losses[key])
    (losses["loss_distill_crosskd_cls"] + losses["loss_distill_crosskd_box"]).backward()
    assert model.head.cls_subnet[0].weight.grad.abs().sum() > 0


def test_a_tower_layer_beyond_the_towers_is_refused_at_build(tmp_path):
    cfg = retinanet_pair(tmp_path, ["crosskd"], num_convs=2)
    cfg.DISTILL.CROSSKD.LAYER = 3
    with pytest.raises(ValueError, match=r"tower layer 3 does not exist.*\[0, 2\]"):
        build_model(cfg)


def test_tower_requirements_on_a_two_stage_student_are_refused(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["crosskd"])
    with pytest.raises(ValueError, match="head_tower"):
        build_model(cfg)


# ---------------------------------------------------------------- the heads in a model
@pytest.mark.parametrize("heads,keys", [
    (["crosskd"], ["loss_distill_crosskd_cls", "loss_distill_crosskd_box"]),
    (["bckd"], ["loss_distill_bckd_cls", "loss_distill_bckd_loc"]),
])
@pytest.mark.parametrize("arch", ["retinanet", "gfl"])
def test_heads_train_a_step_on_both_dense_kinds(tmp_path, heads, keys, arch):
    if arch == "gfl":
        cfg = distill_gfl_cfg(tmp_path, heads)
    else:
        cfg = retinanet_pair(tmp_path, heads)
    cfg.DISTILL.CROSSKD.LAYER = 1
    model, losses = one_step(cfg)
    assert set(keys) <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    if heads == ["crosskd"]:  # widths differ: the adapters train
        assert len(model.distill_heads["crosskd"].adapters) == 2
        assert all(p.grad is not None for p in model.distill_heads.parameters())
        expected = "kl" if arch == "gfl" else "giou"
        assert model.distill_heads["crosskd"].box_loss == expected


def test_crosskd_runs_the_teacher_head_once_per_step(tmp_path):
    """teacher.dense and teacher.head_tower come from one pass of the teacher's head; the cross
    head calls its layers, not its forward."""
    cfg = retinanet_pair(tmp_path, ["crosskd"])
    cfg.DISTILL.CROSSKD.LAYER = 1
    model = build_model(cfg)
    calls = []
    model.teacher.head.register_forward_hook(lambda *args: calls.append(1))
    one_step(cfg, model)
    assert len(calls) == 1
    assert set(model.teacher_parts()) == {"backbone", "dense head", "dense head on the student's tower"}


def test_crosskd_is_zero_when_the_student_is_the_teacher(tmp_path):
    """Same architecture and weights on both sides: the cross head is the teacher's head on the
    teacher's own tower (align_scale maps it to itself), so both terms vanish."""
    cfg = retinanet_pair(tmp_path, ["crosskd"], student_channels=32, teacher_channels=32)
    cfg.DISTILL.CROSSKD.LAYER = 1
    model = build_model(cfg)
    assert not len(model.distill_heads["crosskd"].adapters)
    model.load_state_dict(model.teacher.state_dict())
    for m in model.modules():  # the teacher runs in eval mode: so must the student's BN here
        m.training = False
    model.training = True  # but the model trains: the distillation path runs
    with EventStorage(0):
        losses = model(random_batch())
    assert losses["loss_distill_crosskd_cls"].abs().item() < 1e-5
    assert losses["loss_distill_crosskd_box"].abs().item() < 1e-4


# ---------------------------------------------------------------- the shipped configs
SHAPES = ["crosskd_retinanet_R_18_half_FPN_1k_shapes.yaml", "crosskd_gfl_R_18_half_FPN_1k_shapes.yaml",
          "bckd_gfl_R_18_half_FPN_1k_shapes.yaml"]


@pytest.mark.parametrize("name", SHAPES)
def test_shapes_config_trains_two_iterations(name, tmp_path, shapes_cache):
    from d2kd.engine import DistillTrainer
    from d2kd.modeling.teacher import build_teacher_cfg

    path = os.path.join(REPO, "configs", "shapes", name)
    teacher_cfg = build_teacher_cfg(load_config(path))
    weights = str(tmp_path / "teacher.pth")
    save_plain_model(teacher_cfg, weights)
    cfg = load_config(path, [
        "DISTILL.TEACHER.WEIGHTS", weights, "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "100", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = trainer.storage.latest()
    head = cfg.DISTILL.HEADS[0]
    assert any(k.startswith(f"loss_distill_{head}_") for k in latest)
    assert all(math.isfinite(v) for k, (v, _) in latest.items() if k.startswith("loss"))


@pytest.mark.parametrize("name,head,weights", [
    ("crosskd_retinanet_R_50_FPN_2x_coco.yaml", "crosskd", {"LAYER": 3, "CLS_WEIGHT": 1.0, "GIOU_WEIGHT": 1.0}),
    ("crosskd_gfl_R_50_FPN_1x_coco.yaml", "crosskd", {"LAYER": 3, "CLS_WEIGHT": 1.0, "KL_WEIGHT": 4.0,
                                                      "KL_TEMPERATURE": 1.0}),
    ("bckd_gfl_R_50_FPN_1x_coco.yaml", "bckd", {"CLS_WEIGHT": 1.0, "CLS_BETA": 1.0, "LOC_WEIGHT": 4.0}),
])
def test_coco_configs_carry_the_authors_settings(name, head, weights):
    cfg = load_config(os.path.join(REPO, "configs", name))
    assert list(cfg.DISTILL.HEADS) == [head] and cfg.MODEL.RESNETS.DEPTH == 50
    node = cfg.DISTILL[head.upper()]
    assert {k: node[k] for k in weights} == weights
