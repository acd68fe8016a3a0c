"""GK's robust distillation: robust weights, the three loss terms, the bank as model state,
and identical prototypes on every rank."""
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from conftest import distill_cfg, fake_context, random_batch, sampled_rois, training_cfg
from d2kd.prototypes.bank import PrototypeBank
from d2kd.engine.prototype_refresh import collect_instance_features, rebuild_bank


def test_robust_weights_lie_in_0_1_and_are_1_without_prototypes():
    torch.manual_seed(0)
    bank = PrototypeBank([8], {8: 16}, {8: 24}, num_classes=3, num_prototypes=4)
    bank.set_class(8, 0, torch.randn(4, 16), torch.randn(4, 24))
    bank.set_class(8, 1, torch.randn(2, 16), torch.randn(2, 24))
    bank.num_builds += 1
    classes = torch.tensor([0, 0, 1, 2, 2] * 40)
    f_s, f_t = torch.randn(200, 16) * 5, -torch.randn(200, 24)
    w = bank.robust_weights(8, classes, f_s, f_t)
    assert w.shape == (200,) and not w.requires_grad
    assert (w >= 0).all() and (w <= 1).all()
    assert (w[classes == 2] == 1).all()  # class 2 has no prototypes
    # the clamp matters: opposite instances would give 1 - |1 - (-1)| = -1
    protos = torch.randn(1, 16)
    bank.set_class(8, 0, protos, torch.randn(1, 24))
    w = bank.robust_weights(8, torch.tensor([0]), protos, -bank.teacher(8)[0, :1])
    assert w.item() == 0.0


def _identical_context(num_classes=3):
    """A context whose student and teacher spaces are identical (same channels, features)."""
    torch.manual_seed(0)
    feats = {s: torch.rand(2, 8, 64 // s, 80 // s) for s in (8, 16)}
    batch = random_batch(num_classes=num_classes)
    logits = torch.randn(12, num_classes + 1)
    from detectron2.structures import Boxes, Instances

    props = []
    for x in batch:
        p = Instances(x["instances"].image_size)
        gt = x["instances"].gt_boxes.tensor
        p.proposal_boxes = Boxes(torch.cat([gt, gt + 2]))
        p.gt_classes = torch.cat([x["instances"].gt_classes, torch.full((3,), num_classes)])
        p.gt_index = torch.cat([torch.arange(3), torch.full((3,), -1)])
        props.append(p)
    ctx = fake_context(
        {s: f.clone().requires_grad_() for s, f in feats.items()},
        {s: f.clone() for s, f in feats.items()},
        [x["instances"] for x in batch],
        num_classes,
        rois=sampled_rois(props, logits.clone().requires_grad_(), num_classes),
        teacher_logits=logits.clone(),
    )
    return ctx


def _gk_head(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["gk"], student_channels=8, teacher_channels=8)
    from d2kd.heads.gk import GKHead
    from detectron2.layers import ShapeSpec

    shapes = {s: ShapeSpec(channels=8, stride=s) for s in (8, 16)}
    head = GKHead(cfg, shapes, shapes)
    for conv in head.adapters.adapters.values():  # two-stage adapter: a 3x3 conv, made the identity
        nn.init.zeros_(conv.bias)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(8)
    return cfg, head, shapes


def test_gk_losses_are_zero_when_student_and_teacher_agree(tmp_path):
    cfg, head, shapes = _gk_head(tmp_path)
    ctx = _identical_context()
    bank = PrototypeBank([8, 16], {8: 8, 16: 8}, {8: 8, 16: 8}, num_classes=3, num_prototypes=2)
    protos = torch.rand(3, 2, 8)
    for s in (8, 16):
        for c in range(3):
            bank.set_class(s, c, protos[c], protos[c])
    bank.num_builds += 1
    ctx.prototype_bank = bank
    with EventStorage(0) as storage:
        losses = head(ctx)
        assert set(losses) == {f"loss_distill_gk_{p}" for p in ("global", "fg", "bg", "response")}
        for k, v in losses.items():
            assert v.item() == pytest.approx(0.0, abs=1e-6), k
        assert storage.latest()["distill/gk_mean_robust_weight"][0] == pytest.approx(1.0)


def test_gk_losses_are_positive_and_finite_when_they_disagree(tmp_path):
    cfg, head, shapes = _gk_head(tmp_path)
    ctx = _identical_context()
    outputs = ctx._outputs
    for s in outputs.teacher_features:
        outputs.teacher_features[s] = outputs.teacher_features[s] + torch.rand_like(outputs.teacher_features[s])
    outputs._teacher_logits = outputs._teacher_logits.flip(1)
    bank = PrototypeBank([8, 16], {8: 8, 16: 8}, {8: 8, 16: 8}, num_classes=3, num_prototypes=2)
    for s in (8, 16):
        bank.set_class(s, 0, torch.rand(2, 8), torch.rand(2, 8))  # classes 1, 2: none
    bank.num_builds += 1
    ctx.prototype_bank = bank
    with EventStorage(0):
        losses = head(ctx)
    for k, v in losses.items():
        assert torch.isfinite(v) and v.item() > 0, k
    sum(losses.values()).backward()
    assert all(torch.isfinite(f.grad).all() for f in ctx.student_features.values())


def test_gk_before_the_first_build_has_no_global_term_and_weight_one(tmp_path, storage):
    cfg = distill_cfg(tmp_path, heads=["gk"])
    model = build_model(cfg)
    model.train()
    losses = model(random_batch(empty_last=True))
    assert losses["loss_distill_gk_global"].item() == 0
    assert all(torch.isfinite(v) for v in losses.values())
    assert "distill/gk_mean_robust_weight" not in storage.latest()


@pytest.mark.parametrize("student", ["rcnn", "retinanet"])
def test_gk_training_step_after_a_build(tmp_path, student, storage):
    cfg = distill_cfg(tmp_path, student, student, heads=["gk", "fitnet", "kd"])
    cfg.DISTILL.FITNET.ROBUST_WEIGHTS = True
    cfg.DISTILL.KD.ROBUST_WEIGHTS = True
    model = build_model(cfg)
    model.train()
    features = collect_instance_features(model, [random_batch(4, seed=i) for i in range(4)], min_size=4)
    assert model.training and not model.teacher.training
    rebuild_bank(model.prototype_bank, features, alpha=10.0)
    counts = model.prototype_bank.prototypes_per_class(16)
    assert (counts > 0).all() and (counts <= cfg.DISTILL.PROTOTYPES.NUM).all()
    losses = model(random_batch(empty_last=True))
    assert losses["loss_distill_gk_global"].item() > 0
    for k, v in losses.items():
        assert torch.isfinite(v), k
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    mean_w = storage.latest()["distill/gk_mean_robust_weight"][0]
    assert 0 <= mean_w <= 1


def test_a_class_absent_from_the_sample_gets_no_prototypes(tmp_path):
    model = build_model(distill_cfg(tmp_path, heads=["gk"]))
    batch = random_batch(4)
    for x in batch:
        x["instances"].gt_classes[:] = 1
    rebuild_bank(model.prototype_bank, collect_instance_features(model, [batch], min_size=4), alpha=10.0)
    assert model.prototype_bank.prototypes_per_class(8).tolist()[0] == 0
    assert model.prototype_bank.prototypes_per_class(8).tolist()[2] == 0
    assert model.prototype_bank.prototypes_per_class(8).tolist()[1] > 0


def _gk_training_cfg(tmp_path, max_iter):
    cfg = training_cfg(tmp_path, heads=["gk"], max_iter=max_iter)
    cfg.DISTILL.GK.FEATURE_WEIGHT = 1e-6
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES = 8
    cfg.DISTILL.PROTOTYPES.MIN_SIZE = 4
    cfg.DISTILL.PROTOTYPES.NUM = 3
    cfg.DISTILL.PROTOTYPES.START_ITER = 1
    cfg.DISTILL.PROTOTYPES.PERIOD = 0
    return cfg


def test_prototypes_are_saved_and_restored_on_resume(tmp_path, shapes_cache):
    from d2kd.engine import DistillTrainer

    cfg = _gk_training_cfg(tmp_path, max_iter=2)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    bank = trainer.model.prototype_bank
    assert bank.num_builds.item() == 1
    built = {k: v.clone() for k, v in bank.state_dict().items()}
    assert built["valid_s8"].any()

    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 3
    resumed = DistillTrainer(cfg)
    assert not resumed.model.prototype_bank.is_built
    resumed.resume_or_load(resume=True)
    for k, v in resumed.model.prototype_bank.state_dict().items():
        assert torch.equal(v, built[k]), k
    resumed.train()  # PERIOD 0: the restored bank is kept, not rebuilt
    assert resumed.model.prototype_bank.num_builds.item() == 1


def _two_rank_refresh(cfg, out_dir):
    from d2kd.engine import DistillTrainer
    from detectron2.utils import comm

    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    bank = trainer.model.module.prototype_bank
    torch.save(bank.state_dict(), os.path.join(out_dir, f"bank_rank{comm.get_rank()}.pth"))


def test_two_processes_end_with_identical_prototypes(tmp_path, shapes_cache):
    from detectron2.engine import launch

    cfg = _gk_training_cfg(tmp_path, max_iter=2)
    cfg.SOLVER.IMS_PER_BATCH = 4
    os.environ["OMP_NUM_THREADS"] = "1"
    launch(_two_rank_refresh, 2, dist_url="auto", args=(cfg, str(tmp_path)))
    a = torch.load(tmp_path / "bank_rank0.pth")
    b = torch.load(tmp_path / "bank_rank1.pth")
    assert a["num_builds"].item() == 1 and a["valid_s8"].any()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_visualize_prototypes_writes_galleries_and_histogram(tmp_path, shapes_cache):
    import subprocess
    import sys

    from conftest import write_yaml
    from d2kd.engine import DistillTrainer

    cfg = _gk_training_cfg(tmp_path, max_iter=2)
    cfg.DATASETS.TEST = ("d2kd_shapes_val",)
    cfg.TEST.EVAL_PERIOD = 0
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    for h in list(trainer._hooks):  # no final evaluation: only the checkpoint matters here
        if type(h).__name__ == "EvalHook":
            trainer._hooks.remove(h)
    trainer.train()
    config_file = write_yaml(cfg, tmp_path / "gk.yaml")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "tools", "visualize_prototypes.py"), "--config-file", config_file,
         "--weights", os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), "--output-dir", str(tmp_path / "pics"),
         "--num-images", "8"],
        env=dict(os.environ, D2KD_CACHE=str(shapes_cache)), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pics = sorted(os.listdir(tmp_path / "pics"))
    assert "robust_weights.png" in pics
    assert any(p.startswith("prototypes_s8_") for p in pics)
