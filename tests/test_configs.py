"""Every shipped config loads, and its teacher config resolves with a matching label space."""
import glob
import os

import pytest

from d2kd.config import load_config
from d2kd.modeling.teacher import build_teacher_cfg, num_classes_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO) for p in CONFIGS])
def test_config_loads_from_any_working_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    if cfg.MODEL.META_ARCHITECTURE.startswith("Distill") and not os.path.basename(path).startswith("Base-"):
        assert cfg.DISTILL.HEADS, "a distillation config enables at least one head"
        teacher = build_teacher_cfg(cfg)
        assert num_classes_of(teacher) == num_classes_of(cfg)
        assert cfg.DISTILL.TEACHER.WEIGHTS or "shapes" in path


def test_coco_gk_config_is_the_documented_one():
    cfg = load_config(os.path.join(REPO, "configs", "gk_faster_r50.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "DistillRCNN"
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
    assert cfg.DISTILL.TEACHER.WEIGHTS.startswith("detectron2://COCO-Detection/faster_rcnn_R_101_FPN_3x/")
    assert cfg.MODEL.RESNETS.DEPTH == 50 and "ImageNetPretrained" in cfg.MODEL.WEIGHTS
    assert (cfg.DISTILL.GK.GLOBAL_WEIGHT, cfg.DISTILL.GK.FEATURE_WEIGHT, cfg.DISTILL.GK.RESPONSE_WEIGHT) == (1.0, 1.0, 5.0)
    assert cfg.DISTILL.PROTOTYPES.NUM == 10 and cfg.DISTILL.PROTOTYPES.ALPHA == 10.0
