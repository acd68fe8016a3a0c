"""--resume with another distillation set-up or another teacher (issue 20, items 4 and 5): what
the user sees (output, exit code) and what the checkpoints hold."""
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import detector_cfg, save_plain_model, training_cfg, write_yaml
from d2kd.engine.resume import RECORD_KEY, file_sha256

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gk_run(tmp_path, max_iter=2):
    """GK trained in this process for ``max_iter`` iterations (bank built at 0, PERIOD 0);
    ``model_final.pth`` its only checkpoint. Returns (cfg, config file)."""
    from d2kd.engine import DistillTrainer

    cfg = training_cfg(tmp_path, heads=["gk"], max_iter=max_iter)
    cfg.DISTILL.GK.FEATURE_WEIGHT = 1e-6
    p = cfg.DISTILL.PROTOTYPES
    p.MAX_IMAGES, p.MIN_SIZE, p.NUM, p.START_ITER, p.PERIOD = 4, 4, 3, 0, 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, write_yaml(cfg, tmp_path / "gk.yaml")


def resume(config_file, *opts, cwd, cache):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_file, "--resume", *opts],
        cwd=str(cwd), env=dict(os.environ, D2KD_CACHE=str(cache), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def finished_gk(tmp_path_factory, shapes_cache):
    tmp_path = tmp_path_factory.mktemp("gk_run")
    cfg, config_file = gk_run(tmp_path)
    return tmp_path, cfg, config_file


@pytest.mark.parametrize("change,opts,expected", [
    ("other heads", ["DISTILL.HEADS", "['defeat']"],
     ["DISTILL.HEADS: ['gk'] in the checkpoint, ['defeat'] now", "distillation parameters and buffers: "]),
    ("other GK strides", ["DISTILL.GK.STRIDES", "[8, 16]"],
     ["DISTILL.GK.STRIDES: [] (every stride both models have) in the checkpoint, [8, 16] now",
      "distillation parameters and buffers: 6 of the checkpoint's absent now (distill_heads.gk.adapters"]),
    ("plain student", ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"],
     ["MODEL.META_ARCHITECTURE: DistillRCNN in the checkpoint, GeneralizedRCNN now",
      "DISTILL.HEADS: ['gk'] in the checkpoint, none (no distillation) now"]),
])
def test_resume_with_a_changed_distillation_set_up_says_what_changed_and_what_to_do(
        finished_gk, shapes_cache, change, opts, expected):
    tmp_path, cfg, config_file = finished_gk
    out = cfg.OUTPUT_DIR
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if ".pth" in f}
    code, log = resume(config_file, *opts, cwd=tmp_path, cache=shapes_cache)
    assert code != 0
    final = os.path.join(out, "model_final.pth")
    assert (f"ResumeMismatchError: cannot --resume from {final}: it was written by another distillation "
            "set-up than this config's:") in log, log[-3000:]
    for line in expected:
        assert line in log, (line, log[-3000:])
    assert f"OUTPUT_DIR <a new folder> MODEL.WEIGHTS {final}, without --resume" in log
    for raw in ("parameter group", "size mismatch", "Skip loading parameter", "Starting training"):
        assert raw not in log, raw  # refused before anything was loaded
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if ".pth" in f} == before


def test_the_advised_new_run_from_the_checkpoint_weights_trains(finished_gk, shapes_cache):
    tmp_path, cfg, config_file = finished_gk
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_file, "DISTILL.HEADS",
         "['defeat']", "OUTPUT_DIR", str(tmp_path / "defeat"), "MODEL.WEIGHTS", final, "SOLVER.MAX_ITER", "1"],
        cwd=str(tmp_path), env=dict(os.environ, D2KD_CACHE=str(shapes_cache), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert os.path.exists(tmp_path / "defeat" / "model_final.pth")


def test_resume_with_another_teacher_warns_loudly_and_rebuilds_the_bank(tmp_path, shapes_cache):
    cfg, config_file = gk_run(tmp_path)
    out = cfg.OUTPUT_DIR
    old_teacher = cfg.DISTILL.TEACHER.WEIGHTS
    saved = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert saved[RECORD_KEY]["teacher"] == {"weights": old_teacher, "sha256": file_sha256(old_teacher)}
    new_teacher = str(tmp_path / "retrained_teacher.pth")
    save_plain_model(detector_cfg("rcnn", 32, num_classes=6), new_teacher, seed=7)  # training_cfg's teacher
    code, log = resume(config_file, "DISTILL.TEACHER.WEIGHTS", new_teacher, "SOLVER.MAX_ITER", "3",
                       cwd=tmp_path, cache=shapes_cache)
    assert code == 0, log[-3000:]
    assert re.search(r"WARNING.* THE TEACHER CHANGED SINCE THIS CHECKPOINT: it was trained with "
                     f"DISTILL.TEACHER.WEIGHTS = '{re.escape(old_teacher)}'", log), log[-3000:]
    assert f"this run's teacher is '{new_teacher}'" in log
    assert "the prototype bank, built with the old teacher, is rebuilt at the next step" in log
    assert ("Rebuilding the prototype bank at iteration 2: the checkpoint's prototypes were built with "
            "another teacher") in log
    assert "Prototype build at iteration 2" in log
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert final["iteration"] == 2
    assert final[RECORD_KEY]["teacher"] == {"weights": new_teacher, "sha256": file_sha256(new_teacher)}
    assert final["model"]["prototype_bank.num_builds"].item() == 1
    assert not torch.equal(final["model"]["prototype_bank.teacher_s8"], saved["model"]["prototype_bank.teacher_s8"])


def test_resume_with_the_same_teacher_at_another_path_is_quiet(tmp_path, shapes_cache):
    """The teacher is identified by its content: a moved or copied file is the same teacher."""
    from d2kd.engine import DistillTrainer

    cfg, _ = gk_run(tmp_path)
    copy = str(tmp_path / "moved" / "teacher.pth")
    os.makedirs(os.path.dirname(copy))
    shutil.copy(cfg.DISTILL.TEACHER.WEIGHTS, copy)
    cfg.defrost()
    cfg.DISTILL.TEACHER.WEIGHTS = copy
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    lg = logging.getLogger("d2kd")
    lg.addHandler(handler)
    try:
        resumed = DistillTrainer(cfg)
        resumed.resume_or_load(resume=True)
    finally:
        lg.removeHandler(handler)
    assert resumed.start_iter == 2
    assert resumed.model.prototype_bank.is_built  # restored, not cleared
    assert not [r.getMessage() for r in records if "TEACHER" in r.getMessage()]


def test_a_teacher_is_another_only_when_both_contents_are_known_and_differ():
    from d2kd.engine.resume import teacher_change

    def record(weights, sha):
        return {"teacher": {"weights": weights, "sha256": sha}}

    assert teacher_change(record("a.pth", "1" * 64), record("moved/a.pth", "1" * 64)) == ""
    assert teacher_change(None, record("a.pth", "1" * 64)) == ""  # a checkpoint without a record
    assert teacher_change(record("a.pth", ""), record("a.pth", "2" * 64)) == ""  # file gone at save
    assert teacher_change(record("a.pth", "1" * 64), record("b.pth", "2" * 64)).startswith(
        "THE TEACHER CHANGED SINCE THIS CHECKPOINT: it was trained with DISTILL.TEACHER.WEIGHTS = 'a.pth' "
        "(sha256 111111111111), this run's teacher is 'b.pth' (sha256 222222222222)")
