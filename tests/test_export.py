"""tools/export_student.py: a distilled student ships as a plain detectron2 model."""
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg

from conftest import training_cfg, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_briefly(tmp_path):
    from d2kd.engine import DistillTrainer

    cfg = training_cfg(tmp_path, heads=["fitnet"], max_iter=2)
    cfg.DATASETS.TEST = ("d2kd_shapes_val",)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg


def test_exported_student_loads_in_stock_detectron2_and_predicts_the_same(tmp_path, shapes_cache):
    cfg = _train_briefly(tmp_path)
    config_file = write_yaml(cfg, tmp_path / "distill.yaml")
    env = dict(os.environ, D2KD_CACHE=str(shapes_cache))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "export_student.py"), "--config-file", config_file,
         "--output-dir", str(tmp_path / "release"), "--verify", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "verified: stock detectron2 loads it with no missing or unexpected keys" in proc.stdout
    assert int(re.search(r"(\d+) detections", proc.stdout).group(1)) > 0

    files = sorted(os.listdir(tmp_path / "release"))
    weights = [f for f in files if f.endswith(".pth")]
    assert len(weights) == 1 and re.fullmatch(r"model_final_[0-9a-f]{6}\.pth", weights[0])
    state = torch.load(tmp_path / "release" / weights[0], weights_only=True)["model"]
    assert not [k for k in state if k.startswith(("distill_heads", "prototype_bank"))]

    plain = get_cfg()  # stock config: fails on any d2kd-only key
    plain.merge_from_file(str(tmp_path / "release" / "config.yaml"))
    assert plain.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert "DISTILL" not in plain


def test_export_of_a_corrupt_checkpoint_says_so(tmp_path):
    from d2kd.export import export_student

    bad = tmp_path / "model_final.pth"
    bad.write_bytes(b"\x80\x02truncated")
    cfg = training_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="corrupt, truncated, or not a d2kd checkpoint"):
        export_student(cfg, str(bad), str(tmp_path / "release"))
    assert not (tmp_path / "release").exists() or not os.listdir(tmp_path / "release")
