"""Several teachers at once (DISTILL.TEACHERS): each head reads the teacher its node's TEACHER
names, every teacher is hidden, frozen and strictly loaded, runs only as far as its heads ask,
and GK's prototypes are per teacher-student pair."""
import os

import pytest
import torch
from detectron2.config import CfgNode as CN
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import detector_cfg, distill_cfg, random_batch, save_plain_model, write_yaml
from d2kd.checkpoint import AtomicDetectionCheckpointer
from d2kd.config import DEFAULT_TEACHER, load_config
from d2kd.engine.prototype_refresh import collect_instance_features, rebuild_bank
from d2kd.modeling.teacher import TeacherConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_teacher(cfg, tmp_path, name, arch="retinanet", channels=24, seed=2):
    """Save a random plain ``arch`` teacher under ``tmp_path`` and name it in DISTILL.TEACHERS
    (only CONFIG_FILE and WEIGHTS: the other keys read as their defaults)."""
    t_cfg = detector_cfg(arch, channels, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    yaml = write_yaml(t_cfg, tmp_path / f"teacher_{name}.yaml")
    weights = str(tmp_path / f"teacher_{name}.pth")
    save_plain_model(t_cfg, weights, seed=seed)
    cfg.DISTILL.TEACHERS[name] = CN({"CONFIG_FILE": yaml, "WEIGHTS": weights})
    return weights


def two_teacher_cfg(tmp_path, heads=("fitnet", "pkd")):
    """FitNet from the default 32-channel R-CNN teacher, PKD from a 24-channel RetinaNet one."""
    cfg = distill_cfg(tmp_path, heads=heads)
    add_teacher(cfg, tmp_path, "RETINA")
    cfg.DISTILL.PKD.TEACHER = "RETINA"
    return cfg


def count_backbone_calls(model):
    calls = {name: 0 for name in model.teacher_slots()}
    for name, slot in model.teacher_slots().items():
        def hook(module, inputs, output, name=name):
            calls[name] += 1
        slot.module.backbone.register_forward_hook(hook)
    return calls


def step_losses(model, batch, seed=0):
    torch.manual_seed(seed)  # the same RPN / RoI sampling in every model compared
    with EventStorage(0):
        return model(batch)


def test_two_teachers_train_a_step_and_each_head_reads_its_own(tmp_path):
    cfg = two_teacher_cfg(tmp_path)
    model = build_model(cfg).train()
    slots = model.teacher_slots()
    assert list(slots) == [DEFAULT_TEACHER, "RETINA"] and slots[DEFAULT_TEACHER].module is model.teacher
    assert model.head_teachers == {"fitnet": DEFAULT_TEACHER, "pkd": "RETINA"}
    # built with their own teacher's channels: FitNet's adapters end at 32, PKD's at 24
    fitnet_out = {p.shape[0] for n, p in model.distill_heads.fitnet.named_parameters() if n.endswith("weight")}
    pkd_out = {p.shape[0] for n, p in model.distill_heads.pkd.named_parameters() if n.endswith("weight")}
    assert fitnet_out == {32} and pkd_out == {24}
    calls = count_backbone_calls(model)
    batch = random_batch()
    losses = step_losses(model, batch)
    assert calls == {DEFAULT_TEACHER: 1, "RETINA": 1}  # each teacher ran once, its backbone only
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for s in slots.values() for p in s.module.parameters())
    assert model.distill_heads.pkd.adapters.parameters().__next__().grad is not None

    # each head's loss is the one a single-teacher model with that head's teacher computes
    state = model.state_dict()
    for head, teacher_yaml, weights in [
        ("fitnet", cfg.DISTILL.TEACHER.CONFIG_FILE, cfg.DISTILL.TEACHER.WEIGHTS),
        ("pkd", cfg.DISTILL.TEACHERS.RETINA.CONFIG_FILE, cfg.DISTILL.TEACHERS.RETINA.WEIGHTS),
    ]:
        single_cfg = distill_cfg(tmp_path, heads=[head])
        single_cfg.DISTILL.TEACHER.CONFIG_FILE, single_cfg.DISTILL.TEACHER.WEIGHTS = teacher_yaml, weights
        single = build_model(single_cfg).train()
        own = {k: v for k, v in state.items() if not k.startswith("distill_heads.") or k.startswith(f"distill_heads.{head}.")}
        incompatible = single.load_state_dict(own)
        assert not incompatible.missing_keys and not incompatible.unexpected_keys
        alone = step_losses(single, batch)
        key = f"loss_distill_{head}"
        assert torch.allclose(alone[key], losses[key].detach()), (head, alone[key], losses[key])
        assert alone[key] != 0


def test_a_teacher_no_head_reads_is_loaded_but_never_runs(tmp_path):
    cfg = two_teacher_cfg(tmp_path)
    add_teacher(cfg, tmp_path, "UNUSED", arch="rcnn", channels=16, seed=3)
    model = build_model(cfg).train()
    assert model.teacher_slots()["UNUSED"].heads == []
    calls = count_backbone_calls(model)
    step_losses(model, random_batch())
    assert calls == {DEFAULT_TEACHER: 1, "RETINA": 1, "UNUSED": 0}
    # a head of the default teacher only: the named one never runs either
    cfg.DISTILL.HEADS = ["fitnet"]
    model = build_model(cfg).train()
    calls = count_backbone_calls(model)
    step_losses(model, random_batch())
    assert calls == {DEFAULT_TEACHER: 1, "RETINA": 0, "UNUSED": 0}


def test_a_head_naming_an_unknown_teacher_is_a_build_error_naming_both(tmp_path):
    cfg = two_teacher_cfg(tmp_path)
    cfg.DISTILL.PKD.TEACHER = "RETINANET"
    with pytest.raises(TeacherConfigError) as e:
        build_model(cfg)
    text = str(e.value)
    assert "'pkd'" in text and "'RETINANET'" in text and "DISTILL.PKD.TEACHER" in text
    assert "RETINA (DISTILL.TEACHERS.RETINA)" in text and "DISTILL.TEACHER)" in text


def test_every_teacher_is_hidden_frozen_in_eval_and_strictly_loaded(tmp_path):
    cfg = two_teacher_cfg(tmp_path)
    model = build_model(cfg)
    model.train()
    own = {id(p) for p in model.parameters()}
    retina = model.teacher_slots()["RETINA"].module
    saved = torch.load(cfg.DISTILL.TEACHERS.RETINA.WEIGHTS)["model"]
    assert all(torch.equal(v, retina.state_dict()[k]) for k, v in saved.items())
    for slot in model.teacher_slots().values():
        assert not {id(p) for p in slot.module.parameters()} & own
        assert all(not p.requires_grad for p in slot.module.parameters())
        assert not any(m.training for m in slot.module.modules())
    assert not any(k.startswith("teacher") or "_teacher" in k for k in model.state_dict())
    model.to(torch.float64)
    assert next(retina.parameters()).dtype == torch.float64
    model.to(torch.float32)
    # the default teacher's checkpoint is not the RetinaNet teacher's: refused, naming its key
    cfg.DISTILL.TEACHERS.RETINA.WEIGHTS = cfg.DISTILL.TEACHER.WEIGHTS
    with pytest.raises(TeacherConfigError, match=r"DISTILL\.TEACHERS\.RETINA\.WEIGHTS = .* does not match"):
        build_model(cfg)
    cfg.DISTILL.TEACHERS.RETINA.WEIGHTS = str(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match=r"DISTILL\.TEACHERS\.RETINA\.WEIGHTS"):
        build_model(cfg)
    # a .pkl from outside the model zoo: the advice names this teacher's own ALLOW_PICKLE
    cfg.DISTILL.TEACHERS.RETINA.WEIGHTS = str(tmp_path / "teacher.pkl")
    with pytest.raises(TeacherConfigError, match=r"DISTILL\.TEACHERS\.RETINA\.WEIGHTS .*set "
                                                 r"DISTILL\.TEACHERS\.RETINA\.ALLOW_PICKLE True"):
        build_model(cfg)


def test_a_named_teacher_with_other_classes_is_refused_naming_its_key(tmp_path):
    cfg = two_teacher_cfg(tmp_path)
    cfg.DISTILL.TEACHERS.RETINA.OPTS = ["MODEL.RETINANET.NUM_CLASSES", "5"]
    with pytest.raises(TeacherConfigError, match=r"teacher DISTILL\.TEACHERS\.RETINA predicts 5 classes"):
        build_model(cfg)


def gk_cfg(tmp_path):
    """GK from a 24-channel R-CNN teacher R24, FitNet with robust weights from the default
    32-channel one: two prototype banks, one per pair."""
    cfg = distill_cfg(tmp_path, heads=["gk", "fitnet"])
    add_teacher(cfg, tmp_path, "R24", arch="rcnn", channels=24)
    cfg.DISTILL.GK.TEACHER = "R24"
    cfg.DISTILL.FITNET.ROBUST_WEIGHTS = True
    return cfg


def build_banks(model):
    batches = [random_batch(4, seed=i) for i in range(4)]
    for name, bank in model.prototype_banks().items():
        extra = {} if name == DEFAULT_TEACHER else {"teacher": name}
        features = collect_instance_features(model, batches, min_size=4, **extra)
        # the features are of this bank's teacher: its channels
        assert {f_t.shape[1] for per_class in features.values() for _, f_t, _ in per_class.values()} == \
            {bank.teacher(bank.strides[0]).shape[-1]}
        rebuild_bank(bank, features, alpha=10.0)


def test_gk_prototypes_are_per_teacher_student_pair(tmp_path):
    model = build_model(gk_cfg(tmp_path)).train()
    banks = model.prototype_banks()
    assert set(banks) == {DEFAULT_TEACHER, "R24"}
    assert banks[DEFAULT_TEACHER] is model.prototype_bank
    s = banks["R24"].strides[0]
    assert banks["R24"].teacher(s).shape[-1] == 24 and banks[DEFAULT_TEACHER].teacher(s).shape[-1] == 32
    assert banks["R24"].student(s).shape[-1] == 16
    state = model.state_dict()
    assert any(k.startswith("extra_prototype_banks.R24.teacher_s") for k in state)
    assert any(k.startswith("prototype_bank.teacher_s") for k in state)
    build_banks(model)
    assert all((bank.prototypes_per_class(16) > 0).all() for bank in banks.values())
    assert all(bank.is_built for bank in banks.values())
    losses = step_losses(model, random_batch())
    assert torch.isfinite(losses["loss_distill_gk_global"]) and losses["loss_distill_gk_global"] > 0
    assert all(torch.isfinite(v) for v in losses.values())


def test_a_two_teacher_checkpoint_restores_both_banks(tmp_path):
    cfg = gk_cfg(tmp_path)
    model = build_model(cfg).train()
    build_banks(model)
    (tmp_path / "out").mkdir()
    AtomicDetectionCheckpointer(model, str(tmp_path / "out")).save("model_0000000")
    fresh = build_model(cfg)
    assert not any(b.is_built for b in fresh.prototype_banks().values())
    AtomicDetectionCheckpointer(fresh, str(tmp_path / "out")).resume_or_load("", resume=True)
    for name, bank in model.prototype_banks().items():
        restored = fresh.prototype_banks()[name]
        assert restored.is_built
        assert all(torch.equal(v, restored.state_dict()[k]) for k, v in bank.state_dict().items())


def test_a_single_teacher_checkpoint_keeps_its_keys(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["gk"])
    state = build_model(cfg).state_dict()
    assert any(k.startswith("prototype_bank.") for k in state)
    assert not any(k.startswith("extra_prototype_banks.") for k in state)


def test_a_yaml_names_teachers_relative_to_itself_and_a_dumped_config_reloads(tmp_path, monkeypatch):
    cfg = two_teacher_cfg(tmp_path)
    folder = tmp_path / "configs"
    folder.mkdir()
    # a relative CONFIG_FILE, written in a base yaml, resolves beside that yaml
    retina_yaml = folder / "retina.yaml"
    os.replace(cfg.DISTILL.TEACHERS.RETINA.CONFIG_FILE, retina_yaml)
    weights = cfg.DISTILL.TEACHERS.RETINA.WEIGHTS
    del cfg.DISTILL["TEACHERS"]["RETINA"]
    base = write_yaml(cfg, folder / "base.yaml")
    leaf = folder / "leaf.yaml"
    leaf.write_text('_BASE_: "base.yaml"\nDISTILL:\n  TEACHERS:\n    RETINA:\n      CONFIG_FILE: "retina.yaml"\n'
                    '  PKD:\n    TEACHER: "RETINA"\n')
    assert os.path.isfile(base)
    monkeypatch.chdir(tmp_path)
    loaded = load_config(str(leaf), ["DISTILL.TEACHERS.RETINA.WEIGHTS", weights,
                                     "DISTILL.TEACHERS.RETINA.OPTS", "['MODEL.RETINANET.NUM_CONVS', 1]"])
    node = loaded.DISTILL.TEACHERS.RETINA
    assert node.CONFIG_FILE == str(retina_yaml) and node.WEIGHTS == weights
    assert node.ALLOW_PICKLE is False and node.CASCADE_STAGE == -1  # omitted keys: their defaults
    dumped = write_yaml(loaded, tmp_path / "dumped.yaml")
    again = load_config(dumped)
    assert again.DISTILL.TEACHERS == loaded.DISTILL.TEACHERS and again.DISTILL.PKD.TEACHER == "RETINA"
    model = build_model(again).train()
    assert set(model.teacher_slots()) == {DEFAULT_TEACHER, "RETINA"}
    assert all(torch.isfinite(v) for v in step_losses(model, random_batch()).values())


def test_a_teacher_node_with_an_unknown_key_is_refused(tmp_path):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text('DISTILL:\n  TEACHERS:\n    RETINA:\n      WEIGHT: "x.pth"\n')
    with pytest.raises(TeacherConfigError, match=r"DISTILL\.TEACHERS\.RETINA has key\(s\) WEIGHT"):
        load_config(str(yaml))


def test_the_shipped_two_teacher_config_builds_both_teachers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = os.path.join(REPO, "configs", "shapes", "gk_faster_rcnn_R_18_half_FPN_1k_withpkdretina_shapes.yaml")
    cfg = load_config(path, ["MODEL.DEVICE", "cpu"])
    weights = {}
    for name, node in [("default", cfg.DISTILL.TEACHER), ("retina", cfg.DISTILL.TEACHERS.RETINA)]:
        weights[name] = str(tmp_path / f"{name}.pth")
        save_plain_model(load_config(node.CONFIG_FILE, ["MODEL.DEVICE", "cpu"]), weights[name])
    cfg.DISTILL.TEACHER.WEIGHTS, cfg.DISTILL.TEACHERS.RETINA.WEIGHTS = weights["default"], weights["retina"]
    model = build_model(cfg)
    assert model.head_teachers == {"gk": DEFAULT_TEACHER, "pkd": "RETINA"}
    assert type(model.teacher_slots()["RETINA"].module).__name__ == "RetinaNet"
    assert set(model.prototype_banks()) == {DEFAULT_TEACHER}


def test_a_two_teacher_run_builds_each_bank_with_its_teacher_and_resumes(tmp_path, shapes_cache):
    """Through DistillTrainer: the refresh hook builds the named teacher's bank; a resume restores
    it, and a resume with another named teacher (by content) rebuilds that bank only."""
    from conftest import training_cfg
    from d2kd.engine import DistillTrainer
    from d2kd.engine.resume import RECORD_KEY, file_sha256

    cfg = training_cfg(tmp_path, heads=["gk", "fitnet"], max_iter=2)
    weights = add_teacher(cfg, tmp_path, "R24", arch="rcnn", channels=24)
    cfg.DISTILL.GK.TEACHER = "R24"
    cfg.DISTILL.GK.FEATURE_WEIGHT = 1e-6
    p = cfg.DISTILL.PROTOTYPES
    p.MAX_IMAGES, p.MIN_SIZE, p.NUM, p.START_ITER, p.PERIOD = 4, 4, 3, 0, 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    trainer = DistillTrainer(cfg)
    assert set(trainer.model.prototype_banks()) == {"R24"} and trainer.model.prototype_bank is None
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=True)
    assert saved[RECORD_KEY]["teachers"] == {"R24": {"weights": weights, "sha256": file_sha256(weights)}}
    assert saved["model"]["extra_prototype_banks.R24.num_builds"].item() == 1
    assert saved["model"]["extra_prototype_banks.R24.teacher_s8"].shape[-1] == 24
    from d2kd.export import student_state_dict  # an exported student holds none of them

    assert not any(k.startswith(("extra_prototype_banks.", "prototype_bank.", "distill_heads."))
                   for k in student_state_dict(os.path.join(cfg.OUTPUT_DIR, "model_final.pth")))

    cfg.SOLVER.MAX_ITER = 3
    again = DistillTrainer(cfg)
    again.resume_or_load(resume=True)
    bank = again.model.prototype_banks()["R24"]
    assert bank.is_built and torch.equal(bank.teacher(8), saved["model"]["extra_prototype_banks.R24.teacher_s8"])

    other = str(tmp_path / "retrained_r24.pth")
    save_plain_model(detector_cfg("rcnn", 24, num_classes=6), other, seed=7)
    cfg.DISTILL.TEACHERS.R24.WEIGHTS = other
    changed = DistillTrainer(cfg)
    changed.resume_or_load(resume=True)
    bank = changed.model.prototype_banks()["R24"]
    assert not bank.is_built and "another teacher" in bank.rebuild_reason
