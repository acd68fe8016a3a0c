"""Training through DistillTrainer / train_net.py: checkpoints, resume, 2 CPU processes."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import training_cfg, write_yaml
from d2kd.checkpoint import AtomicDetectionCheckpointer
from d2kd.engine import DistillTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkpoints_hold_the_student_and_adapters_but_never_the_teacher(tmp_path, shapes_cache):
    cfg = training_cfg(tmp_path)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)
    keys = set(saved["model"])
    assert keys == set(trainer.model.state_dict())
    assert any(k.startswith("distill_heads.fitnet.adapters") for k in keys)
    # the teacher's keys have the same names as the student's but other shapes (32 vs 16 ch)
    student_state = trainer.model.state_dict()
    assert all(saved["model"][k].shape == student_state[k].shape for k in keys)
    assert not [k for k in keys if "teacher" in k]
    assert {"trainer", "iteration"} <= set(saved)


def test_resume_continues_from_the_last_checkpoint(tmp_path, shapes_cache):
    cfg = training_cfg(tmp_path, max_iter=2)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 4
    resumed = DistillTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    first = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)["model"]
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, first[k]), k


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    ckpt = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001")
    good = open(tmp_path / "model_0000001.pth", "rb").read()

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000001")
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000002")
    assert open(tmp_path / "model_0000001.pth", "rb").read() == good
    assert not (tmp_path / "model_0000002.pth").exists()
    assert open(tmp_path / "last_checkpoint").read() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_a_corrupt_checkpoint_on_resume_names_the_file_and_the_fix(tmp_path):
    model = torch.nn.Linear(2, 2)
    (tmp_path / "model_final.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    ckpt = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"(?s)could not read checkpoint .*model_final.pth.*last_checkpoint"):
        ckpt.resume_or_load("", resume=True)


def test_train_net_with_two_cpu_processes(tmp_path, shapes_cache):
    cfg = training_cfg(tmp_path, max_iter=3)
    cfg.SOLVER.IMS_PER_BATCH = 4  # 2 per process
    config_file = write_yaml(cfg, tmp_path / "distill.yaml")
    env = dict(os.environ, D2KD_CACHE=str(shapes_cache), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_file,
         "--num-gpus", "2", "MODEL.DEVICE", "cpu"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Starting training from iteration 0" in log
    assert os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    with open(os.path.join(cfg.OUTPUT_DIR, "log.txt")) as f:
        assert "loss_distill_fitnet" in f.read()


def test_own_coco_dataset_through_the_documented_launcher(tmp_path):
    """datasets/README.md route 3: register a COCO-format set, then d2kd's invoke_main()."""
    from d2kd.data import generate_shapes_split

    data = tmp_path / "mydata"
    generate_shapes_split(str(data), "train", 6, seed=5, image_size=96)
    generate_shapes_split(str(data), "val", 3, seed=6, image_size=96)
    launcher = tmp_path / "my_train_net.py"
    launcher.write_text(
        "from detectron2.data.datasets import register_coco_instances\n"
        "from d2kd.train_net import invoke_main\n"
        f"register_coco_instances('mydata_train', {{}}, '{data}/train.json', '{data}/train')\n"
        f"register_coco_instances('mydata_val', {{}}, '{data}/val.json', '{data}/val')\n"
        "if __name__ == '__main__':\n"
        "    invoke_main()\n"
    )
    cfg = training_cfg(tmp_path, max_iter=2)
    cfg.DATASETS.TRAIN = ("mydata_train",)
    cfg.DATASETS.TEST = ("mydata_val",)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # a 2-iteration model must still predict boxes
    config_file = write_yaml(cfg, tmp_path / "mine.yaml")
    proc = subprocess.run(
        [sys.executable, str(launcher), "--config-file", config_file, "MODEL.DEVICE", "cpu"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Evaluation results for bbox" in log


def test_a_finished_stage_is_reused_and_an_interrupted_one_resumes(tmp_path, shapes_cache, monkeypatch):
    """What `make demo` relies on to skip finished stages and resume interrupted ones."""
    from d2kd.engine import experiment

    cfg = training_cfg(tmp_path, max_iter=4)
    cfg.DATASETS.TEST = ("d2kd_shapes_val",)
    config_file = write_yaml(cfg, tmp_path / "stage.yaml")
    out = str(tmp_path / "stage")
    # a run that stopped after its checkpoint at iteration 2, before evaluating
    stopped = experiment.DistillTrainer(experiment.load_config(config_file, ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", "2"]))
    stopped.train()
    assert experiment.stage_results(out) is None

    starts = []
    resume = experiment.DistillTrainer.resume_or_load

    def recording_resume(self, resume_flag=True):
        resume(self, resume=resume_flag)
        starts.append(self.start_iter)

    monkeypatch.setattr(experiment.DistillTrainer, "resume_or_load", lambda self, resume=True: recording_resume(self, resume))
    results = experiment.train_and_evaluate(config_file, out)
    assert starts == [2]
    assert set(results) >= {"AP", "AP50", "AP75"}
    assert json.dumps(experiment.stage_results(out)) == json.dumps(results)  # NaN-safe equality

    def must_not_train(self):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(experiment.DistillTrainer, "train", must_not_train)
    assert json.dumps(experiment.train_and_evaluate(config_file, out)) == json.dumps(results)


RANK_KILLING_LAUNCHER = '''
import os, time
from d2kd.engine import DistillTrainer

run_step = DistillTrainer.run_step


def run_step_losing_rank_1(self):  # top level: spawned workers run it too
    from detectron2.utils import comm

    if comm.get_rank() == 1 and self.iter == 2:
        with open(os.environ["KILLED_AT"], "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), 9)
    return run_step(self)


DistillTrainer.run_step = run_step_losing_rank_1
from d2kd.train_net import invoke_main

if __name__ == "__main__":
    invoke_main()
'''


def test_a_two_rank_run_that_loses_a_rank_exits_non_zero_within_seconds(tmp_path, shapes_cache):
    cfg = training_cfg(tmp_path, max_iter=50)
    cfg.SOLVER.IMS_PER_BATCH = 4  # 2 per process
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    config_file = write_yaml(cfg, tmp_path / "distill.yaml")
    launcher = tmp_path / "launcher.py"
    launcher.write_text(RANK_KILLING_LAUNCHER)
    killed_at = tmp_path / "killed_at"
    env = dict(os.environ, D2KD_CACHE=str(shapes_cache), OMP_NUM_THREADS="1", KILLED_AT=str(killed_at))
    proc = subprocess.run(
        [sys.executable, str(launcher), "--config-file", config_file, "--num-gpus", "2", "MODEL.DEVICE", "cpu"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
    )
    ended = time.time()
    log = proc.stdout + proc.stderr
    assert killed_at.exists(), log[-3000:]
    assert proc.returncode != 0
    assert ended - float(killed_at.read_text()) < 20, log[-2000:]
    assert "Starting training from iteration 0" in log
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))


def test_a_stages_seed_seeds_every_rng_before_the_trainer_is_built(tmp_path, monkeypatch):
    """The stage runner seeds torch, numpy and random from SEED as train_net.py does
    (detectron2's default_setup), before the model and data loader draw anything: the same
    seed gives the same draws, another seed others, SEED -1 a random one."""
    import random

    import numpy as np

    from d2kd.engine import experiment

    class _Built(Exception):
        pass

    draws = []

    class RecordingTrainer:
        def __init__(self, cfg):
            draws.append((torch.rand(3).tolist(), np.random.rand(), random.random()))
            raise _Built

    monkeypatch.setattr(experiment, "DistillTrainer", RecordingTrainer)
    config_file = write_yaml(training_cfg(tmp_path), tmp_path / "stage.yaml")
    for i, seed in enumerate([3, 3, 4, -1]):
        with pytest.raises(_Built):
            experiment.train_and_evaluate(config_file, str(tmp_path / f"stage{i}"), ["SEED", str(seed)])
    assert draws[0] == draws[1]
    assert draws[2] != draws[0] and draws[3] != draws[0]


def test_a_lazyconfig_stage_goes_to_the_lazyconfig_loop(tmp_path, monkeypatch):
    """A .py stage (the ViTDet teacher of bench_shapes_seeds) is trained by d2kd's LazyConfig
    loop with its "key=value" overrides, under the same contract."""
    from d2kd import lazy_train_net
    from d2kd.engine import experiment

    calls = []
    monkeypatch.setattr(lazy_train_net, "train_and_evaluate_lazy",
                        lambda config, out, overrides=(): calls.append((config, out, list(overrides))) or {"AP": 1.0})
    assert experiment.train_and_evaluate("teacher.py", str(tmp_path), ["train.seed=0"]) == {"AP": 1.0}
    assert calls == [("teacher.py", str(tmp_path), ["train.seed=0"])]
