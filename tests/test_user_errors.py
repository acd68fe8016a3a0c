"""What a user sees when train_net.py meets a bad file (issue 20, items 1 and 7): the whole
output of the process, its exit code and what it leaves on disk."""
import json
import os
import subprocess
import sys

import cv2
import pytest
import torch

from conftest import training_cfg, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torch's advice for a file that weights_only=True refuses: it must never reach the user.
TORCH_ADVICE = ("weights_only` set to `False`", "weights_only=False", "trusted source",
                "Re-running `torch.load`", "Weights only load failed", "safe_globals")


def train_net(config_file, *opts, cwd, launcher=None, env=None):
    """Run train_net.py (or ``launcher``); (exit code, stdout + stderr)."""
    proc = subprocess.run(
        [sys.executable, str(launcher or os.path.join(REPO, "train_net.py")), "--config-file", config_file,
         *opts],
        cwd=str(cwd), env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
        capture_output=True, text=True, timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


class _RunsCode:
    """Unpickling this runs os.mkdir: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --------------------------------------------------------------------------------------------
# Item 1: no message the user sees passes on torch's advice to set weights_only=False


@pytest.mark.parametrize("where", ["resume", "MODEL.WEIGHTS", "DISTILL.TEACHER.WEIGHTS", "--eval-only"])
def test_a_file_that_carries_code_is_refused_and_torch_advice_never_reaches_the_output(
        tmp_path, shapes_cache, where):
    cfg = training_cfg(tmp_path, max_iter=1)
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    teacher = torch.load(cfg.DISTILL.TEACHER.WEIGHTS, weights_only=True)
    torch.save(dict(teacher, extra=_RunsCode(str(marker))), evil)
    if where == "resume":
        os.makedirs(cfg.OUTPUT_DIR)
        evil = evil.rename(os.path.join(cfg.OUTPUT_DIR, "model_0000009.pth"))
        (tmp_path / "out" / "last_checkpoint").write_text("model_0000009.pth")
        opts = ["--resume"]
    elif where == "--eval-only":
        opts = [where, "MODEL.WEIGHTS", str(evil)]
    else:
        opts = [where, str(evil)]
    config_file = write_yaml(cfg, tmp_path / "distill.yaml")
    code, log = train_net(config_file, *opts, cwd=tmp_path, env={"D2KD_CACHE": str(shapes_cache)})
    assert code != 0
    assert not marker.exists()  # the payload never ran
    assert f"could not read checkpoint '{evil}'" in log, log[-3000:]
    assert "not a plain checkpoint of tensors" in log
    for advice in TORCH_ADVICE:
        assert advice not in log, (advice, log[-3000:])
    assert "The above exception was the direct cause" not in log


# --------------------------------------------------------------------------------------------
# Item 7: smaller ones


def test_a_truncated_jpeg_in_the_training_set_is_named(tmp_path, shapes_cache):
    from d2kd.data import generate_shapes_split

    data = tmp_path / "mydata"
    generate_shapes_split(str(data), "train", 2, seed=5, image_size=96)
    with open(data / "train.json") as f:
        coco = json.load(f)
    image = coco["images"][1]
    jpeg = cv2.imencode(".jpg", cv2.imread(str(data / "train" / image["file_name"])))[1].tobytes()
    (data / "train" / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    image["file_name"] = "broken.jpg"
    with open(data / "train.json", "w") as f:
        json.dump(coco, f)
    launcher = tmp_path / "my_train_net.py"
    launcher.write_text(
        "from detectron2.data.datasets import register_coco_instances\n"
        "from d2kd.train_net import invoke_main\n"
        f"register_coco_instances('mydata_train', {{}}, '{data}/train.json', '{data}/train')\n"
        "if __name__ == '__main__':\n"
        "    invoke_main()\n"
    )
    cfg = training_cfg(tmp_path, max_iter=2)
    cfg.DATASETS.TRAIN = ("mydata_train",)  # 2 images, batch 2: the first batch reads both
    code, log = train_net(write_yaml(cfg, tmp_path / "mine.yaml"), cwd=tmp_path, launcher=launcher,
                          env={"D2KD_CACHE": str(shapes_cache)})
    assert code != 0
    assert f"cannot read training image '{data}/train/broken.jpg' (in DATASETS.TRAIN ('mydata_train',))" in log, \
        log[-3000:]
    assert "image file is truncated" in log and "re-encode" in log
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))


@pytest.mark.parametrize("tag", ["", "model_0000003.pth"])
def test_an_empty_or_dangling_last_checkpoint_says_what_and_how_to_fall_back(tmp_path, shapes_cache, tag):
    cfg = training_cfg(tmp_path, max_iter=1)
    out = cfg.OUTPUT_DIR
    os.makedirs(out)
    (tmp_path / "out" / "model_0000001.pth").write_bytes(b"an earlier checkpoint")
    (tmp_path / "out" / "last_checkpoint").write_text(tag)
    code, log = train_net(write_yaml(cfg, tmp_path / "distill.yaml"), "--resume", cwd=tmp_path,
                          env={"D2KD_CACHE": str(shapes_cache)})
    assert code != 0
    last = os.path.join(out, "last_checkpoint")
    problem = f"{last} is empty" if not tag else f"{last} names 'model_0000003.pth', which does not exist"
    assert f"cannot resume: {problem}" in log, log[-3000:]
    assert "write the file name of one of its checkpoints into it (model_0000001.pth)" in log
    assert "AssertionError" not in log
    assert [f for f in os.listdir(out) if f.endswith(".pth")] == ["model_0000001.pth"]
    assert open(last).read() == tag  # left as it was


def test_teacher_weights_naming_a_directory_say_it_is_one(tmp_path, shapes_cache):
    cfg = training_cfg(tmp_path, max_iter=1)
    folder = tmp_path / "teacher_run"
    folder.mkdir()
    os.link(cfg.DISTILL.TEACHER.WEIGHTS, folder / "model_final.pth")
    code, log = train_net(write_yaml(cfg, tmp_path / "distill.yaml"), "DISTILL.TEACHER.WEIGHTS", str(folder),
                          cwd=tmp_path, env={"D2KD_CACHE": str(shapes_cache)})
    assert code != 0
    assert (f"DISTILL.TEACHER.WEIGHTS = '{folder}' is a directory, not a checkpoint file. Point the key at "
            f"the teacher's checkpoint in it, e.g. {folder}/model_final.pth") in log, log[-3000:]
    assert "does not exist" not in log


def test_resume_past_max_iter_is_an_error_that_says_nothing_was_trained(tmp_path, shapes_cache):
    from d2kd.engine import DistillTrainer

    cfg = training_cfg(tmp_path, max_iter=2)  # checkpoints after iterations 1 (and final)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    out = cfg.OUTPUT_DIR
    os.remove(os.path.join(out, "model_final.pth"))
    (tmp_path / "out" / "last_checkpoint").write_text("model_0000001.pth")
    before = sorted(f for f in os.listdir(out) if ".pth" in f)
    code, log = train_net(write_yaml(cfg, tmp_path / "distill.yaml"), "--resume", "SOLVER.MAX_ITER", "1",
                          cwd=tmp_path, env={"D2KD_CACHE": str(shapes_cache)})
    assert code != 0
    assert (f"--resume: the checkpoint {out}/model_0000001.pth ended iteration 1, past SOLVER.MAX_ITER = 1: "
            "nothing would be trained and no model_final.pth written. To train on, set SOLVER.MAX_ITER "
            "above 2") in log, log[-3000:]
    assert "--eval-only MODEL.WEIGHTS" in log
    assert "Starting training" not in log
    assert sorted(f for f in os.listdir(out) if ".pth" in f) == before  # no checkpoint written
    # at SOLVER.MAX_ITER the run is finished: said in the log, not an error
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 2
    finished = DistillTrainer(cfg)
    finished.resume_or_load(resume=True)
    assert finished.start_iter == finished.max_iter == 2
