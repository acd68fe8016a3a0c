"""GK's global term in its two forms (the authors' cosine rows, the paper's Eq. 5 / Eq. 6
projection) and GK without robust weights, on inputs small enough to compute by hand."""
import math
from types import SimpleNamespace

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from conftest import distill_cfg, fake_context
from d2kd.heads.gk import GKHead
from d2kd.heads.robust_weights import (
    StepInstances, global_relation_loss, projection_coefficients, step_instances,
)
from d2kd.prototypes.bank import PrototypeBank

ALPHA = 10.0


def _bank(strides=(8,)):
    """Classes 0 and 1 with one prototype each, the same unit vectors in both spaces
    (class 0: e_y, class 1: e_x); class 2 without prototypes."""
    bank = PrototypeBank(list(strides), {s: 2 for s in strides}, {s: 2 for s in strides}, num_classes=3,
                         num_prototypes=1)
    for s in strides:
        bank.set_class(s, 0, torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
        bank.set_class(s, 1, torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    bank.num_builds += 1
    return bank


def test_projection_coefficients_are_eq5_by_hand():
    p = torch.tensor([[0.5, -0.2]])  # cosines to two prototypes, student space
    q = torch.tensor([[0.3, 0.1]])   # teacher space
    c_s, c_t = projection_coefficients(p, q, ALPHA)
    # (alpha (p + q) + p) / (1 + 2 alpha): (10 * 0.8 + 0.5) / 21 and (10 * -0.1 - 0.2) / 21
    assert c_s.tolist()[0] == pytest.approx([8.5 / 21, -1.2 / 21])
    assert c_t.tolist()[0] == pytest.approx([8.3 / 21, -0.9 / 21])
    # they minimise |a - c_s u|^2 + |b - c_t v|^2 + alpha (c_s - c_t)^2 for unit u, v:
    # the gradient -2p + 2c_s + 2 alpha (c_s - c_t) vanishes (and the same for c_t)
    assert torch.allclose(-p + c_s + ALPHA * (c_s - c_t), torch.zeros(1, 2), atol=1e-7)
    assert torch.allclose(-q + c_t + ALPHA * (c_t - c_s), torch.zeros(1, 2), atol=1e-7)


def _two_stride_instances(requires_grad=False):
    """Stride 8: two instances, stride 16: one. Student / teacher features and robust weights:
    - 8, #0: f_s (1, 0) -> cosines (class 0, class 1) (0, 1); f_t (0.6, 0.8) -> (0.8, 0.6); w 0.5
    - 8, #1: f_s (0, 2) -> (1, 0); f_t (0, 1) -> (1, 0); w 1 (rows agree)
    - 16, #2: f_s = f_t = (1, 0); w 1 (rows agree)
    """
    f_s8 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=requires_grad)
    f_t8 = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    f_16 = torch.tensor([[1.0, 0.0]])
    instances = StepInstances(
        boxes=torch.zeros(3, 4), classes=torch.tensor([1, 0, 1]), batch=torch.zeros(3, dtype=torch.long),
        stride=torch.tensor([8, 8, 16]), weight=torch.tensor([0.5, 1.0, 1.0]),
        features={8: (torch.tensor([0, 1]), f_s8, f_t8), 16: (torch.tensor([2]), f_16.clone(), f_16)},
    )
    ctx = SimpleNamespace(zero_loss=lambda: torch.zeros(()), prototype_bank=_bank((8, 16)))
    return ctx, instances, f_s8


def test_cosine_form_is_the_smooth_l1_element_mean_per_stride_by_hand():
    ctx, instances, f_s8 = _two_stride_instances(requires_grad=True)
    loss = global_relation_loss(ctx, instances, [8, 16], "cosine", ALPHA)
    # stride 8: w * (rows_s - rows_t) = 0.5 * ((0, 1) - (0.8, 0.6)) = (-0.4, 0.2) and (0, 0);
    # smooth-L1 (beta 1) 0.5 x^2, mean over the 2 x 2 elements; stride 16 adds 0
    expected = (0.5 * 0.4 ** 2 + 0.5 * 0.2 ** 2) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert f_s8.grad is not None and f_s8.grad.abs().sum() > 0  # it trains the student's features


def test_projection_form_sums_over_prototypes_and_divides_by_the_instances_by_hand():
    ctx, instances, _ = _two_stride_instances()
    loss = global_relation_loss(ctx, instances, [8, 16], "projection", ALPHA)
    # instance #0: c_s - c_t = (rows_s - rows_t) / 21 = (-0.8, 0.4) / 21; smooth-L1 summed over the
    # two prototypes, times its weight 0.5; the other two instances add 0; N = 3 instances
    expected = 0.5 * (0.5 * (0.8 / 21) ** 2 + 0.5 * (0.4 / 21) ** 2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_the_forms_differ_by_the_prototype_count_over_the_consistency_factor():
    # one instance, w = 1, all differences inside smooth-L1's quadratic range: projection =
    # cosine * P / (1 + 2 alpha)^2 with P the prototype columns (here 2): weaker on the built-in
    # data's 6 classes x 10 prototypes (60 / 441), stronger on COCO's 800 columns (800 / 441)
    ctx, instances, _ = _two_stride_instances()
    instances.weight[:] = 1.0
    cosine = global_relation_loss(ctx, instances, [8], "cosine", ALPHA)
    projection = global_relation_loss(ctx, instances, [8], "projection", ALPHA)
    # cosine: mean over 2 instances x 2 prototypes; projection: sum over 2 prototypes / 2 instances
    assert projection.item() == pytest.approx(cosine.item() * 2 / (1 + 2 * ALPHA) ** 2, rel=1e-6)


def test_an_unknown_global_form_is_refused():
    ctx, instances, _ = _two_stride_instances()
    with pytest.raises(ValueError, match="global form must be one of"):
        global_relation_loss(ctx, instances, [8], "relations", ALPHA)


# ---------------------------------------------------------------- through the head
def _head(tmp_path, **gk):
    cfg = distill_cfg(tmp_path, heads=["gk"])
    cfg.DISTILL.GK.RESPONSE_WEIGHT = 0.0
    cfg.DISTILL.GK.INSTANCES = "gt"
    for k, v in gk.items():
        cfg.DISTILL.GK[k] = v
    shapes = {s: ShapeSpec(channels=2, stride=s) for s in (8, 16)}
    head = GKHead(cfg, shapes, shapes)
    for conv in head.adapters.adapters.values():
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return head


def _one_box_context():
    """One 20 px box of class 1 (stride 8); the student's feature is (1, 1) everywhere, the
    teacher's (1, 0): the robust weight is 1 - |cos((1,1),(1,0)) - cos((1,0),(1,0))| = 1/sqrt(2)."""
    inst = Instances((32, 32))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0]]))
    inst.gt_classes = torch.tensor([1])
    student = {8: torch.ones(1, 2, 4, 4), 16: torch.ones(1, 2, 2, 2)}
    teacher = {s: torch.cat([torch.ones_like(f[:, :1]), torch.zeros_like(f[:, :1])], 1) for s, f in student.items()}
    ctx = fake_context(student, teacher, [inst], num_classes=3)
    ctx.prototype_bank = _bank((8, 16))
    return ctx


@pytest.mark.parametrize("form", ["cosine", "projection"])
@pytest.mark.parametrize("robust", [True, False])
def test_gk_global_term_by_hand_in_each_form_with_and_without_robust_weights(tmp_path, form, robust):
    head = _head(tmp_path, GLOBAL_FORM=form, ROBUST_WEIGHTS=robust)
    ctx = _one_box_context()
    with EventStorage(0):
        loss = head(ctx)["loss_distill_gk_global"].item()
    r = 1 / math.sqrt(2)
    # rows over (class 0, class 1): student (r, r), teacher (0, 1); difference (r, r - 1)
    d = [r, r - 1]
    w = r if robust else 1.0
    if form == "cosine":
        expected = sum(0.5 * (w * x) ** 2 for x in d) / 2  # mean over the two elements
    else:
        expected = w * sum(0.5 * (x / (1 + 2 * ALPHA)) ** 2 for x in d) / 1  # one instance
    assert loss == pytest.approx(expected, rel=1e-5)
    # the step's shared instances keep their robust weight for the other heads
    assert step_instances(ctx, "gt").weight.item() == pytest.approx(r, rel=1e-5)


def test_gk_rejects_an_unknown_global_form(tmp_path):
    with pytest.raises(ValueError, match="DISTILL.GK.GLOBAL_FORM must be one of"):
        _head(tmp_path, GLOBAL_FORM="rows")


@pytest.mark.parametrize("student", ["rcnn", "retinanet"])
def test_a_model_step_with_the_projection_form_and_without_robust_weights(tmp_path, student):
    from detectron2.modeling import build_model

    from conftest import random_batch
    from d2kd.engine.prototype_refresh import collect_instance_features, rebuild_bank

    cfg = distill_cfg(tmp_path, student, student, heads=["gk"])
    cfg.DISTILL.GK.GLOBAL_FORM = "projection"
    cfg.DISTILL.GK.ROBUST_WEIGHTS = False
    cfg.DISTILL.GK.FEATURE_WEIGHT = 0.0  # the ablation's way of switching a term off
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        features = collect_instance_features(model, [random_batch(4, seed=i) for i in range(4)], min_size=4)
        rebuild_bank(model.prototype_bank, features, alpha=10.0)
        losses = model(random_batch(empty_last=True))
        assert losses["loss_distill_gk_global"].item() > 0 and losses["loss_distill_gk_fg"].item() == 0
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
