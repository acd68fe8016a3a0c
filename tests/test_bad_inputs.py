"""Every bad input gets an error that names the problem and the fix."""
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
    with pytest.raises(TeacherConfigError, match="teacher predicts 5 classes but the student predicts 3"):
        build_model(cfg)


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
    with pytest.raises(TeacherConfigError, match="corrupt or not a checkpoint"):
        build_model(cfg)


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
