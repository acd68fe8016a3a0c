"""Mixed precision (SOLVER.AMP.ENABLED): the teacher under the student's autocast, the
distillation losses in float32; bfloat16 on CPU, float16 + GradScaler on CUDA."""
import math

import pytest
import torch

from conftest import training_cfg


def _gk_amp_cfg(tmp_path, device):
    cfg = training_cfg(tmp_path, heads=["gk"], max_iter=3)
    cfg.MODEL.DEVICE = device
    cfg.SOLVER.AMP.ENABLED = True
    cfg.DISTILL.GK.FEATURE_WEIGHT = 1e-6
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES = 8
    cfg.DISTILL.PROTOTYPES.MIN_SIZE = 4
    cfg.DISTILL.PROTOTYPES.NUM = 3
    cfg.DISTILL.PROTOTYPES.START_ITER = 1  # a bank from iteration 1 on: every GK term runs
    cfg.DISTILL.PROTOTYPES.PERIOD = 0
    return cfg


def _train_and_watch(cfg):
    """Train ``cfg``; return what the teacher produced and what the GK head returned."""
    from d2kd.engine import DistillTrainer
    from d2kd.engine.trainer import DistillAMPTrainer

    trainer = DistillTrainer(cfg)
    assert isinstance(trainer._trainer, DistillAMPTrainer)
    model = trainer.model
    seen = {"teacher_backbone": [], "teacher_box_head": [], "losses": [], "head_autocast": []}

    def backbone_hook(module, inputs, outputs):
        if torch.is_grad_enabled() is False and model.training:  # a training step's teacher pass
            seen["teacher_backbone"].append({k: v.dtype for k, v in outputs.items()})

    def box_hook(module, inputs, outputs):
        seen["teacher_box_head"].append(outputs[0].dtype)

    def head_pre_hook(module, inputs):
        seen["head_autocast"].append(torch.is_autocast_enabled(model.device.type))

    def head_hook(module, inputs, outputs):
        seen["losses"].append({k: (v.dtype, float(v)) for k, v in outputs.items()})

    model.teacher.backbone.register_forward_hook(backbone_hook)
    model.teacher.roi_heads.box_predictor.register_forward_hook(box_hook)
    model.distill_heads["gk"].register_forward_pre_hook(head_pre_hook)
    model.distill_heads["gk"].register_forward_hook(head_hook)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer, seen


def _check(trainer, seen, half):
    assert trainer.model.prototype_bank.is_built
    assert len(seen["losses"]) == 3
    # the teacher ran under the student's autocast
    assert seen["teacher_backbone"] and all(
        d == half for step in seen["teacher_backbone"] for d in step.values()
    ), seen["teacher_backbone"]
    assert seen["teacher_box_head"] and set(seen["teacher_box_head"]) == {half}
    # the heads ran with autocast off, and every term is float32 and finite
    assert seen["head_autocast"] == [False] * 3
    for step in seen["losses"]:
        assert {"loss_distill_gk_global", "loss_distill_gk_fg", "loss_distill_gk_bg",
                "loss_distill_gk_response"} <= set(step)
        for key, (dtype, value) in step.items():
            assert dtype == torch.float32, key
            assert math.isfinite(value), key
    assert any(v > 0 for k, (_, v) in seen["losses"][-1].items() if k.endswith("global"))
    history = trainer.storage.history("total_loss").values()
    assert len(history) == 3 and all(math.isfinite(v) for v, _ in history)


def test_cpu_bfloat16_training_runs_the_teacher_in_bfloat16_and_losses_in_float32(tmp_path, shapes_cache):
    cfg = _gk_amp_cfg(tmp_path, "cpu")
    trainer, seen = _train_and_watch(cfg)
    assert trainer._trainer.precision == torch.bfloat16
    assert not trainer._trainer.grad_scaler.is_enabled()  # bfloat16 needs no loss scaling
    _check(trainer, seen, torch.bfloat16)
    # the student's parameters stay float32 (autocast casts per op) and were updated
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_amp_trainer_checkpoint_keeps_the_scaler_state(tmp_path, shapes_cache):
    from d2kd.engine.trainer import DistillAMPTrainer

    cfg = _gk_amp_cfg(tmp_path, "cpu")
    trainer, _ = _train_and_watch(cfg)
    state = trainer._trainer.state_dict()
    assert "grad_scaler" in state
    trainer._trainer.load_state_dict(state)
    assert isinstance(trainer._trainer, DistillAMPTrainer)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU on this machine: the float16 + GradScaler AMP path is untested here")
def test_cuda_float16_training_runs_the_teacher_in_float16_and_losses_in_float32(tmp_path, shapes_cache):
    cfg = _gk_amp_cfg(tmp_path, "cuda")
    trainer, seen = _train_and_watch(cfg)
    assert trainer._trainer.precision == torch.float16
    assert trainer._trainer.grad_scaler.is_enabled()
    _check(trainer, seen, torch.float16)
