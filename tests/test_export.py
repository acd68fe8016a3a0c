"""tools/export_student.py: a distilled student ships as a plain detectron2 model, checked in a
process that cannot import d2kd, validated before anything is written, written as a set."""
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conftest import distill_cfg, training_cfg, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT = os.path.join(REPO, "tools", "export_student.py")

# A consumer's script: stock detectron2 only (any d2kd import fails), optional modules to run.
CONSUMER = r'''
import importlib.abc, runpy, sys

class NoD2kd(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "d2kd":
            raise ImportError("d2kd imported")

sys.meta_path.insert(0, NoD2kd())
import cv2, numpy as np
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor

for module in sys.argv[2:]:
    runpy.run_path(module)
import os

path = sys.argv[1]
cfg = get_cfg()
cfg.merge_from_file(path)
# the loading snippet at the top of a release's config.yaml: paths relative to the config
cfg.MODEL.WEIGHTS = os.path.join(os.path.dirname(path), cfg.MODEL.WEIGHTS)
predictor = DefaultPredictor(cfg)
print("instances:", len(predictor(np.zeros((64, 64, 3), dtype=np.uint8))["instances"]))
'''


def _export(*args, env=None):
    return subprocess.run([sys.executable, EXPORT, *args], env=dict(os.environ, **(env or {})),
                          capture_output=True, text=True, timeout=300)


def _consumer(config, *modules):
    return subprocess.run([sys.executable, "-c", CONSUMER, config, *modules], capture_output=True,
                          text=True, timeout=300)


def _train_briefly(tmp_path):
    from d2kd.engine import DistillTrainer

    cfg = training_cfg(tmp_path, heads=["fitnet"], max_iter=2)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    cfg.DATASETS.TEST = ("d2kd_shapes_val",)  # what --verify takes its images from
    return cfg


def test_exported_student_loads_in_stock_detectron2_and_predicts_the_same(tmp_path, shapes_cache):
    cfg = _train_briefly(tmp_path)
    config_file = write_yaml(cfg, tmp_path / "distill.yaml")
    # no teacher: export builds and loads only the student (item 2)
    proc = _export("--config-file", config_file, "--output-dir", str(tmp_path / "release"), "--verify",
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "DISTILL.TEACHER.WEIGHTS", "",
                   "DISTILL.TEACHER.CONFIG_FILE", str(tmp_path / "no_such_teacher.yaml"),
                   env={"D2KD_CACHE": str(shapes_cache)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "verified: stock detectron2 (no d2kd) loads it with no missing or unexpected keys" in proc.stdout
    assert "needs: stock detectron2 only" in proc.stdout
    assert int(re.search(r"(\d+) detections", proc.stdout).group(1)) > 0

    files = sorted(os.listdir(tmp_path / "release"))
    weights = [f for f in files if f.endswith(".pth")]
    assert files == sorted(weights + ["config.yaml", "release.json"])
    assert len(weights) == 1 and re.fullmatch(r"model_final_[0-9a-f]{6}\.pth", weights[0])
    state = torch.load(tmp_path / "release" / weights[0], weights_only=True)["model"]
    assert not [k for k in state if k.startswith(("distill_heads", "prototype_bank"))]

    plain = get_cfg()  # stock config: fails on any d2kd-only key
    plain.merge_from_file(str(tmp_path / "release" / "config.yaml"))
    assert plain.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert "DISTILL" not in plain
    consumer = _consumer(str(tmp_path / "release" / "config.yaml"))
    assert consumer.returncode == 0 and "instances:" in consumer.stdout, consumer.stderr[-2000:]


def _distill_checkpoint(tmp_path, backbone, res2):
    """A d2kd training checkpoint (student + adapters) of a student with ``backbone``."""
    cfg = distill_cfg(tmp_path)
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = res2
    cfg.DATASETS.TEST = ()
    torch.manual_seed(0)
    model = build_model(cfg)
    assert any(k.startswith("distill_heads.") for k in model.state_dict())
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": model.state_dict(), "iteration": 9}, path)
    return cfg, path


def _images(folder, n=3):
    import cv2
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        cv2.imwrite(os.path.join(folder, f"img{i}.jpg"), (rng.random((64, 80, 3)) * 255).astype("uint8"))
    return str(folder)


def test_a_student_with_a_d2kd_only_backbone_ships_the_module_and_says_so(tmp_path):
    cfg, weights = _distill_checkpoint(tmp_path, "build_basic_resnet_fpn_backbone", res2=32)
    config_file = write_yaml(cfg, tmp_path / "narrow.yaml")
    release = tmp_path / "release"
    proc = _export("--config-file", config_file, "--weights", weights, "--output-dir", str(release),
                   "--verify", "--images", _images(tmp_path / "imgs"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"NEEDS: MODEL.BACKBONE.NAME = build_basic_resnet_fpn_backbone is not in stock detectron2",
                     proc.stdout)
    assert f"run_path('{release}/basic_resnet.py')" in proc.stdout
    assert "verified: stock detectron2 (plus the module(s) above, no d2kd)" in proc.stdout
    assert sorted(os.listdir(release)) == sorted(["basic_resnet.py", "config.yaml", "release.json",
                                                  _weights_name(release)])
    header = open(release / "config.yaml").read().split("\n_BASE_")[0].split("\nCUDNN")[0]
    assert header.startswith("# A detector exported by d2kd")
    assert "build_basic_resnet_fpn_backbone" in header
    assert "runpy.run_path(os.path.join(os.path.dirname(path), 'basic_resnet.py'))" in header
    # what a consumer sees: stock detectron2 alone fails as the issue says; with the module it loads
    bare = _consumer(str(release / "config.yaml"))
    assert bare.returncode != 0 and "build_basic_resnet_fpn_backbone" in bare.stderr
    with_module = _consumer(str(release / "config.yaml"), str(release / "basic_resnet.py"))
    assert with_module.returncode == 0, with_module.stderr[-2000:]


def _weights_name(release):
    return next(f for f in os.listdir(release) if f.endswith(".pth"))


def test_a_d2kd_backbone_that_a_stock_builder_expresses_is_exported_as_the_stock_one(tmp_path):
    cfg, weights = _distill_checkpoint(tmp_path, "build_basic_resnet_fpn_backbone", res2=64)
    config_file = write_yaml(cfg, tmp_path / "full.yaml")
    release = tmp_path / "release"
    proc = _export("--config-file", config_file, "--weights", weights, "--output-dir", str(release),
                   "--verify", "--images", _images(tmp_path / "imgs"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "needs: stock detectron2 only" in proc.stdout
    assert "stock build_resnet_fpn_backbone builds the same model" in proc.stdout
    assert "verified: stock detectron2 (no d2kd)" in proc.stdout  # same predictions as d2kd's builder
    assert sorted(os.listdir(release)) == sorted(["config.yaml", "release.json", _weights_name(release)])
    plain = get_cfg()
    plain.merge_from_file(str(release / "config.yaml"))
    assert plain.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"


def test_a_wrong_config_is_refused_before_anything_is_written(tmp_path):
    from d2kd.export import ExportError, export_student

    cfg, weights = _distill_checkpoint(tmp_path, "build_resnet_fpn_backbone", res2=64)
    cfg.MODEL.FPN.OUT_CHANNELS = 8  # not what the checkpoint was trained with
    with pytest.raises(ExportError, match=r"does not fit the student .*wrong shape: .*fpn"):
        export_student(cfg, weights, str(tmp_path / "release"))
    assert sorted(os.listdir(tmp_path)) == sorted(
        f for f in os.listdir(tmp_path) if not f.startswith("release"))  # no release, no temporary
    # through the tool: a non-zero exit and no files
    proc = _export("--config-file", write_yaml(cfg, tmp_path / "wrong.yaml"), "--weights", weights,
                   "--output-dir", str(tmp_path / "release"))
    assert proc.returncode != 0 and "does not fit the student" in proc.stderr
    assert not [f for f in os.listdir(tmp_path) if f.startswith("release")]


def test_a_failed_check_publishes_nothing_and_an_earlier_release_stays(tmp_path):
    from d2kd.export import ReleaseCheckError, export_student

    cfg, weights = _distill_checkpoint(tmp_path, "build_resnet_fpn_backbone", res2=64)
    first, _ = export_student(cfg, weights, str(tmp_path / "release"))

    def failing_check(directory, config_path, weights_path):
        assert os.path.isfile(config_path) and os.path.isfile(weights_path)
        raise ReleaseCheckError("predictions differ")

    torch.manual_seed(5)
    other = build_model(cfg).state_dict()
    torch.save({"model": other}, tmp_path / "other.pth")
    with pytest.raises(ReleaseCheckError):
        export_student(cfg, str(tmp_path / "other.pth"), str(tmp_path / "release"), check=failing_check)
    assert sorted(os.listdir(tmp_path / "release")) == sorted(["config.yaml", "release.json", os.path.basename(first)])
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]
    second, _ = export_student(cfg, str(tmp_path / "other.pth"), str(tmp_path / "release"))
    assert second != first and sorted(os.listdir(tmp_path / "release")) == sorted(
        ["config.yaml", "release.json", os.path.basename(second)])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a release d2kd wrote"):
        export_student(cfg, weights, str(tmp_path / "notes"))


def test_verify_on_an_own_dataset_registered_like_train_net_and_an_unregistered_one(tmp_path):
    from d2kd.data import generate_shapes_split

    cfg, weights = _distill_checkpoint(tmp_path, "build_resnet_fpn_backbone", res2=64)
    data = tmp_path / "mydata"
    generate_shapes_split(str(data), "val", 3, seed=6, image_size=64)
    launcher = tmp_path / "my_train_net.py"
    launcher.write_text(
        "from detectron2.data.datasets import register_coco_instances\n"
        "from d2kd.train_net import invoke_main\n"
        f"register_coco_instances('heldout_val', {{}}, '{data}/val.json', '{data}/val')\n"
        "if __name__ == '__main__':\n"
        "    raise SystemExit('the launcher must not be run as __main__ by the export')\n"
    )
    cfg.DATASETS.TEST = ("heldout_val",)
    config_file = write_yaml(cfg, tmp_path / "mine.yaml")
    unregistered = _export("--config-file", config_file, "--weights", weights, "--output-dir",
                           str(tmp_path / "release"), "--verify")
    assert unregistered.returncode != 0
    assert "dataset 'heldout_val' is not registered" in unregistered.stderr and "--register" in unregistered.stderr
    assert not (tmp_path / "release").exists()  # checked before writing
    proc = _export("--config-file", config_file, "--weights", weights, "--output-dir", str(tmp_path / "release"),
                   "--verify", "--register", str(launcher))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "verified: stock detectron2 (no d2kd)" in proc.stdout and "3 images" in proc.stdout


def test_export_of_a_corrupt_checkpoint_says_so(tmp_path):
    from d2kd.export import export_student

    bad = tmp_path / "model_final.pth"
    bad.write_bytes(b"\x80\x02truncated")
    cfg = training_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="corrupt, truncated, or not a d2kd checkpoint") as err:
        export_student(cfg, str(bad), str(tmp_path / "release"))
    assert "weights_only=False" not in str(err.value) and "weights_only` set to `False" not in str(err.value)
    assert not (tmp_path / "release").exists()


def _folder(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return {name: (path / name).read_text() for name in files}


def test_a_folder_that_is_not_a_release_is_refused_and_left_as_it_was(tmp_path):
    """Issue 20, item 2: a user's folder holding a config.yaml, a checkpoint and a script was
    taken for an earlier release and wiped, exit 0. Only a folder whose manifest lists exactly
    its files is replaced."""
    cfg, weights = _distill_checkpoint(tmp_path, "build_resnet_fpn_backbone", res2=64)
    config_file = write_yaml(cfg, tmp_path / "student.yaml")
    mine = tmp_path / "work"
    before = _folder(mine, {"config.yaml": "MODEL: {}\n", "teacher.pth": "weights", "train.py": "print(1)\n"})
    proc = _export("--config-file", config_file, "--weights", weights, "--output-dir", str(mine))
    assert proc.returncode != 0
    assert f"--output-dir {mine} is not a release d2kd wrote (it has no release.json)" in proc.stderr
    assert "nothing was written" in proc.stderr and "Traceback" not in proc.stderr
    assert {f: (mine / f).read_text() for f in os.listdir(mine)} == before

    # a release, then a file of the user's put into it: refused too, naming the file
    release = tmp_path / "release"
    assert _export("--config-file", config_file, "--weights", weights, "--output-dir", str(release)).returncode == 0
    (release / "notes.txt").write_text("mine")
    proc = _export("--config-file", config_file, "--weights", weights, "--output-dir", str(release))
    assert proc.returncode != 0 and "also holds files the release did not write (notes.txt)" in proc.stderr
    assert (release / "notes.txt").read_text() == "mine"
    # the release as written is replaced (its manifest lists exactly what it holds)
    os.remove(release / "notes.txt")
    assert _export("--config-file", config_file, "--weights", weights, "--output-dir", str(release)).returncode == 0


def test_a_release_loads_from_wherever_it_is_moved(tmp_path):
    """Issue 20, item 3: config.yaml stored absolute paths, so a moved release failed with
    'Checkpoint ... not found'. MODEL.WEIGHTS is relative to the config and the documented
    snippet (the consumer here, and d2kd.export.load_release_config) resolves it."""
    import shutil

    from d2kd.export import load_release_config

    cfg, weights = _distill_checkpoint(tmp_path, "build_basic_resnet_fpn_backbone", res2=32)
    config_file = write_yaml(cfg, tmp_path / "narrow.yaml")
    proc = _export("--config-file", config_file, "--weights", weights, "--output-dir", str(tmp_path / "release"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = open(tmp_path / "release" / "config.yaml").read()
    assert str(tmp_path) not in text, "no absolute path of the place it was written"
    moved = tmp_path / "elsewhere" / "shipped"
    shutil.move(str(tmp_path / "release"), str(moved))
    consumer = _consumer(str(moved / "config.yaml"), str(moved / "basic_resnet.py"))
    assert consumer.returncode == 0 and "instances:" in consumer.stdout, consumer.stderr[-2000:]
    loaded = load_release_config(str(moved / "config.yaml"))
    assert os.path.isfile(loaded.MODEL.WEIGHTS) and os.path.dirname(loaded.MODEL.WEIGHTS) == str(moved)
