"""DistillRCNN / DistillRetinaNet: the teacher stays hidden and frozen, inference is the
student's, and one training step works for every head and model pair."""
import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from conftest import detector_cfg, distill_cfg, random_batch

PAIRS = [("rcnn", "rcnn"), ("retinanet", "retinanet")]


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_teacher_is_hidden_from_parameters_state_dict_and_optimizer(tmp_path, student, teacher):
    cfg = distill_cfg(tmp_path, student, teacher, heads=["fitnet"])
    model = build_model(cfg)
    teacher_params = {id(p) for p in model.teacher.parameters()}
    assert teacher_params, "the teacher has parameters"
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert not any(k.startswith("teacher") or "_teacher" in k for k in model.state_dict())
    assert len(model.state_dict()) == len(
        [k for k in model.state_dict() if not k.startswith("distill_heads.")]
    ) + len(model.distill_heads.state_dict())
    optimizer = build_optimizer(cfg, model)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not teacher_params & in_optimizer
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_teacher_stays_in_eval_mode_and_follows_device(tmp_path):
    model = build_model(distill_cfg(tmp_path))
    model.train()
    assert model.training and not model.teacher.training
    assert all(not m.training for m in model.teacher.modules())
    model.to(torch.float64)
    assert next(model.teacher.parameters()).dtype == torch.float64
    model.to(torch.float32)


def test_teacher_batchnorm_statistics_do_not_move(tmp_path, storage):
    model = build_model(distill_cfg(tmp_path))
    model.train()
    before = copy.deepcopy(model.teacher.state_dict())
    model(random_batch())
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_inference_equals_the_vanilla_student(tmp_path, student, teacher):
    cfg = distill_cfg(tmp_path, student, teacher, heads=["fitnet", "kd"])
    distill = build_model(cfg).eval()
    plain_cfg = detector_cfg(student, 16)
    vanilla = build_model(plain_cfg).eval()
    incompatible = vanilla.load_state_dict(
        {k: v for k, v in distill.state_dict().items() if not k.startswith("distill_heads.")}
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in random_batch()]
    with torch.no_grad():
        a, b = distill(batch), vanilla(batch)
    for ra, rb in zip(a, b):
        ia, ib = ra["instances"], rb["instances"]
        assert len(ia) == len(ib) and len(ia) > 0
        assert torch.equal(ia.pred_boxes.tensor, ib.pred_boxes.tensor)
        assert torch.equal(ia.scores, ib.scores)
        assert torch.equal(ia.pred_classes, ib.pred_classes)


@pytest.mark.parametrize("student,teacher", PAIRS)
@pytest.mark.parametrize("head", ["fitnet", "kd"])
def test_one_training_step_gives_finite_losses_and_student_only_gradients(tmp_path, student, teacher, head):
    cfg = distill_cfg(tmp_path, student, teacher, heads=[head])
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(random_batch(empty_last=True))
    key = f"loss_distill_{head}"
    assert key in losses
    for name, value in losses.items():
        assert torch.isfinite(value), name
    assert losses[key].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    if head == "fitnet":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.distill_heads.parameters())


@pytest.mark.parametrize("student,teacher", [("retinanet", "rcnn"), ("rcnn", "retinanet")])
def test_heterogeneous_pair_distils_shared_strides(tmp_path, student, teacher, storage):
    cfg = distill_cfg(tmp_path, student, teacher, heads=["fitnet"])
    model = build_model(cfg)
    # R-CNN FPN has strides 4-64, RetinaNet 8-128: the shared ones are 8-64.
    assert model.distill_heads["fitnet"].strides == [8, 16, 32, 64]
    model.train()
    optimizer = build_optimizer(cfg, model)
    losses = model(random_batch())
    assert torch.isfinite(losses["loss_distill_fitnet"])
    sum(losses.values()).backward()
    optimizer.step()


def test_adapters_are_created_only_for_mismatched_channels(tmp_path):
    mismatched = build_model(distill_cfg(tmp_path, student_channels=16, teacher_channels=32))
    adapters = mismatched.distill_heads["fitnet"].adapters.adapters
    assert sorted(adapters.keys()) == ["s16", "s32", "s4", "s64", "s8"]
    assert adapters["s4"].in_channels == 16 and adapters["s4"].out_channels == 32

    (tmp_path / "same").mkdir()
    same = build_model(distill_cfg(tmp_path / "same", student_channels=16, teacher_channels=16))
    assert len(same.distill_heads["fitnet"].adapters.adapters) == 0


def test_distillation_waits_for_start_iter_but_keeps_adapters_in_graph(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["fitnet"])
    cfg.DISTILL.SCHEDULE.START_ITER = 5
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(random_batch())
    assert "loss_distill_fitnet" not in losses
    assert losses["loss_distill_idle"].item() == 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.distill_heads.parameters())
    with EventStorage(5):
        assert "loss_distill_fitnet" in model(random_batch())


def test_linear_decay_scales_the_loss(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["fitnet"])
    cfg.DISTILL.SCHEDULE.LINEAR_DECAY = True
    cfg.SOLVER.MAX_ITER = 100
    model = build_model(cfg)
    model.train()
    batch = random_batch()
    torch.manual_seed(0)
    with EventStorage(0):
        full = model(batch)["loss_distill_fitnet"]
    torch.manual_seed(0)
    with EventStorage(75):
        quarter = model(batch)["loss_distill_fitnet"]
    assert quarter.item() == pytest.approx(full.item() * 0.25, rel=1e-4)


def test_non_finite_distillation_loss_names_its_term(tmp_path):
    model = build_model(distill_cfg(tmp_path, heads=["fitnet"]))
    model.train()
    with torch.no_grad():
        next(model.distill_heads["fitnet"].parameters()).fill_(float("nan"))
    with EventStorage(0), pytest.raises(FloatingPointError, match="loss_distill_fitnet"):
        model(random_batch())


@pytest.mark.parametrize("student", ["rcnn", "retinanet"])
def test_a_deep_copied_model_records_into_its_own_recorder(tmp_path, student):
    # e.g. an EMA copy: its forward must feed its own heads, and never the original's recorder
    cfg = distill_cfg(tmp_path, student, student, heads=["kd"])
    model = build_model(cfg)
    model.train()
    twin = copy.deepcopy(model)
    seen = []
    original_put = model._recorder.put
    model._recorder.put = lambda key, value: (seen.append(key), original_put(key, value))
    with EventStorage(0):
        losses = twin(random_batch())
    assert torch.isfinite(losses["loss_distill_kd"]) and losses["loss_distill_kd"].item() > 0
    assert not seen and not model._recorder.values
    with model._recorder.recording() as values:  # the original's hooks are its own too
        with EventStorage(0):
            twin(random_batch())
    assert not values


def test_gk_from_a_faster_rcnn_teacher_to_a_retinanet_student(tmp_path, storage):
    """The heterogeneous pair of configs/shapes/gk_retinanet_…_fasterteacher_shapes.yaml: GK's
    feature and global terms by stride; the response term cannot pair RoI and anchor logits."""
    cfg = distill_cfg(tmp_path, "retinanet", "rcnn", heads=["gk"])
    cfg.DISTILL.GK.RESPONSE_WEIGHT = 0.0
    model = build_model(cfg)
    assert model.distill_heads["gk"].strides == [8, 16, 32, 64]
    model.train()
    losses = model(random_batch())
    assert {"loss_distill_gk_global", "loss_distill_gk_fg", "loss_distill_gk_bg"} <= set(losses)
    assert "loss_distill_gk_response" not in losses
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_distill_gk_bg"].item() > 0

    cfg.DISTILL.GK.RESPONSE_WEIGHT = 5.0
    with pytest.raises(ValueError, match=r"head 'gk'.*set DISTILL\.GK\.RESPONSE_WEIGHT 0 \(now 5\)"):
        build_model(cfg)
