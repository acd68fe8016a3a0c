"""Every bad input gets an error that names the problem and the fix; checkpoints load safely."""
import os
import pickle
import re

import pytest
import torch
from detectron2.modeling import build_model

from conftest import detector_cfg, distill_cfg, save_plain_model, write_yaml
from d2kd.modeling.teacher import TeacherConfigError


def test_missing_teacher_checkpoint_names_key_and_path(tmp_path):
    cfg = distill_cfg(tmp_path)
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"DISTILL.TEACHER.WEIGHTS = '.*nope.pth' does not exist"):
        build_model(cfg)


def test_empty_teacher_weights(tmp_path):
    cfg = distill_cfg(tmp_path)
    cfg.DISTILL.TEACHER.WEIGHTS = ""
    with pytest.raises(TeacherConfigError, match="DISTILL.TEACHER.WEIGHTS is empty"):
        build_model(cfg)


def test_unknown_teacher_config(tmp_path):
    cfg = distill_cfg(tmp_path)
    cfg.DISTILL.TEACHER.CONFIG_FILE = "COCO-Detection/no_such_model.yaml"
    with pytest.raises(TeacherConfigError, match="neither an existing file nor a detectron2 model-zoo"):
        build_model(cfg)


def test_teacher_config_from_model_zoo_name_is_resolved(tmp_path):
    from d2kd.config import resolve_teacher_config_file as resolve_config_file

    path = resolve_config_file("COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml")
    assert path.endswith("faster_rcnn_R_101_FPN_3x.yaml")


def test_teacher_with_other_classes(tmp_path):
    cfg = distill_cfg(tmp_path, teacher_classes=5)
    with pytest.raises(TeacherConfigError, match="teacher predicts 5 classes but the student predicts 3") as err:
        build_model(cfg)
    assert "MODEL.ROI_HEADS.NUM_CLASSES" in str(err.value)


def test_teacher_checkpoint_with_missing_and_unexpected_keys(tmp_path):
    cfg = distill_cfg(tmp_path)
    state = torch.load(cfg.DISTILL.TEACHER.WEIGHTS)["model"]
    state.pop("roi_heads.box_predictor.cls_score.weight")
    state["roi_heads.extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "bad.pth")
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "bad.pth")
    with pytest.raises(TeacherConfigError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert "missing: roi_heads.box_predictor.cls_score.weight" in msg
    assert "unexpected: roi_heads.extra.weight" in msg


def test_teacher_checkpoint_of_another_architecture(tmp_path):
    cfg = distill_cfg(tmp_path)
    other = detector_cfg("rcnn", fpn_channels=8)
    save_plain_model(other, tmp_path / "other.pth")
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "other.pth")
    with pytest.raises(TeacherConfigError, match="wrong shape: backbone.fpn_lateral2.weight"):
        build_model(cfg)


def test_corrupt_teacher_checkpoint(tmp_path):
    cfg = distill_cfg(tmp_path)
    data = open(cfg.DISTILL.TEACHER.WEIGHTS, "rb").read()
    with open(tmp_path / "truncated.pth", "wb") as f:
        f.write(data[: len(data) // 2])
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "truncated.pth")
    with pytest.raises(TeacherConfigError, match="DISTILL.TEACHER.WEIGHTS: could not read .*truncated.pth") as err:
        build_model(cfg)
    msg = str(err.value)
    assert "corrupt, truncated, or not a checkpoint" in msg
    assert "last_checkpoint" not in msg  # resume advice has no place for a teacher
    assert "weights_only" not in msg.replace("weights_only=True", "")
    assert "teacher's checkpoint again" in msg and len(msg) < 600


def test_a_corrupt_resume_checkpoint_never_advises_weights_only_false(tmp_path):
    from d2kd.checkpoint import AtomicDetectionCheckpointer, CheckpointReadError

    (tmp_path / "model_0000009.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(CheckpointReadError) as err:
        AtomicDetectionCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    msg = str(err.value)
    assert "model_0000009.pth" in msg and "last_checkpoint" in msg
    assert "weights_only=False" not in msg and "set to `False`" not in msg and "trusted source" not in msg
    assert "\n" not in msg and len(msg) < 600


def test_a_student_checkpoint_as_teacher_gets_a_short_summary_and_the_likely_cause(tmp_path):
    cfg = distill_cfg(tmp_path)  # teacher 32 channels, student 16
    student = build_model(cfg)
    torch.save({"model": student.state_dict(), "iteration": 99}, tmp_path / "model_final.pth")
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "model_final.pth")
    with pytest.raises(TeacherConfigError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert len(msg) < 1500, len(msg)
    assert re.search(r"\d+ unexpected: distill_heads\.", msg)
    assert re.search(r"\d+ wrong shape: .*\(file \(", msg) and "more)" in msg
    assert "looks like a d2kd training checkpoint of a distilled student" in msg
    assert "tools/export_student.py" in msg


class _RunsCode:
    """Unpickling this runs os.mkdir: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _loaders():
    from d2kd.checkpoint import AtomicDetectionCheckpointer
    from d2kd.export import StudentCheckpointer, student_state_dict
    from d2kd.modeling.teacher import load_teacher_weights

    return {
        "resume / MODEL.WEIGHTS": lambda model, f: AtomicDetectionCheckpointer(model).load(f),
        "teacher": lambda model, f: load_teacher_weights(model, f),
        "eval-only student": lambda model, f: StudentCheckpointer(model).load(f),
        "export": lambda model, f: student_state_dict(f),
    }


@pytest.mark.parametrize("loader", ["resume / MODEL.WEIGHTS", "teacher", "eval-only student", "export"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, loader):
    marker = tmp_path / "code_ran"
    model = build_model(detector_cfg())
    torch.save({"model": model.state_dict(), "extra": _RunsCode(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises((RuntimeError, ValueError)) as err:
        _loaders()[loader](model, str(tmp_path / "evil.pth"))
    assert not marker.exists()  # weights_only=True: the payload never ran
    msg = str(err.value)
    assert "evil.pth" in msg and "weights_only=False" not in msg and "trusted source" not in msg


def _pickled_model(model, path, payload=None):
    data = {"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "someone"}
    if payload is not None:
        data["extra"] = payload
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


def test_an_untrusted_pkl_is_refused_unless_the_user_opts_in(tmp_path):
    from d2kd.checkpoint import AtomicDetectionCheckpointer, UntrustedPickleError, is_trusted_pickle
    from d2kd.engine.trainer import allow_pickle
    from d2kd.modeling.teacher import load_teacher_weights

    marker = tmp_path / "code_ran"
    cfg = distill_cfg(tmp_path)
    teacher_cfg = detector_cfg("rcnn", 32)
    teacher = build_model(teacher_cfg)
    evil = _pickled_model(teacher, tmp_path / "teacher.pkl", _RunsCode(str(marker)))
    cfg.DISTILL.TEACHER.WEIGHTS = evil
    with pytest.raises(TeacherConfigError, match=r"refusing to load DISTILL.TEACHER.WEIGHTS .*teacher.pkl.*"
                                                 r"DISTILL.TEACHER.ALLOW_PICKLE True"):
        build_model(cfg)
    assert not marker.exists()
    # the student's MODEL.WEIGHTS (and a resume) go through the same rule
    with pytest.raises(UntrustedPickleError, match="DISTILL.TEACHER.ALLOW_PICKLE"):
        AtomicDetectionCheckpointer(build_model(detector_cfg())).resume_or_load(evil, resume=False)
    assert not marker.exists()
    assert not allow_pickle(cfg)
    cfg.DISTILL.TEACHER.ALLOW_PICKLE = True
    assert allow_pickle(cfg)
    # opted in: a .pkl loads (detectron2's own format)
    benign = _pickled_model(teacher, tmp_path / "benign.pkl")
    fresh = build_model(teacher_cfg)
    load_teacher_weights(fresh, benign, allow_pickle=True)
    key = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(fresh.state_dict()[key], teacher.state_dict()[key])
    AtomicDetectionCheckpointer(build_model(teacher_cfg), allow_pickle=True).load(benign)
    # detectron2's model zoo is trusted as before
    assert is_trusted_pickle("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    assert not is_trusted_pickle("/data/R-50.pkl") and not is_trusted_pickle("https://example.com/R-50.pkl")


def test_distilled_model_as_teacher_is_rejected(tmp_path):
    cfg = distill_cfg(tmp_path)
    cfg.DISTILL.TEACHER.CONFIG_FILE = write_yaml(cfg.clone(), tmp_path / "distill.yaml")
    with pytest.raises(TeacherConfigError, match="a teacher must be a plain detector"):
        build_model(cfg)


def test_unknown_head(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["fitnet", "telepathy"])
    with pytest.raises(KeyError, match="'telepathy', which is not a registered distillation head; available: .*fitnet"):
        build_model(cfg)


@pytest.mark.parametrize("student,teacher", [("retinanet", "rcnn"), ("rcnn", "retinanet")])
def test_logit_head_on_a_heterogeneous_pair(tmp_path, student, teacher):
    cfg = distill_cfg(tmp_path, student, teacher, heads=["kd"])
    with pytest.raises(ValueError, match="distillation head 'kd' (requires|pairs)"):
        build_model(cfg)


def test_anchor_head_with_different_anchors(tmp_path):
    cfg = distill_cfg(tmp_path, "retinanet", "retinanet", heads=["kd"])
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[1.0, 2.0, 0.5]]
    with pytest.raises(ValueError, match="anchor generators differ"):
        build_model(cfg)


def test_strides_not_shared(tmp_path):
    cfg = distill_cfg(tmp_path, "retinanet", "rcnn", heads=["fitnet"])
    cfg.DISTILL.FITNET.STRIDES = [4, 8]
    with pytest.raises(ValueError, match=r"DISTILL.FITNET.STRIDES asks for strides \[4\]"):
        build_model(cfg)
