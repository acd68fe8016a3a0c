"""Reliability and own data (issue 11): kill -9 during a save, resume that cannot silently drop
GK, stale temporaries, logs a user sees, divergence during a build, own VOC-format data."""
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import detector_cfg, save_plain_model, training_cfg, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gk_cfg(tmp_path, max_iter, **prototypes):
    """GK on the built-in data, a few CPU iterations; a small, quick prototype build."""
    cfg = training_cfg(tmp_path, heads=["gk"], max_iter=max_iter)
    cfg.DISTILL.GK.FEATURE_WEIGHT = 1e-6
    p = cfg.DISTILL.PROTOTYPES
    p.MAX_IMAGES, p.MIN_SIZE, p.NUM, p.START_ITER, p.PERIOD = 4, 4, 3, 0, 0
    for k, v in prototypes.items():
        setattr(p, k, v)
    return cfg


class Records(logging.Handler):
    """Collects the records of loggers that do not propagate (detectron2's, d2kd's)."""

    def __init__(self, *names):
        super().__init__(logging.DEBUG)
        self.records, self.loggers = [], [logging.getLogger(n) for n in names]

    def emit(self, record):
        self.records.append(record)

    def text(self, level=logging.DEBUG):
        return "\n".join(r.getMessage() for r in self.records if r.levelno >= level)

    def __enter__(self):
        for lg in self.loggers:
            lg.addHandler(self)
            self._levels = getattr(self, "_levels", []) + [lg.level]
            if lg.level == logging.NOTSET or lg.level > logging.INFO:
                lg.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self._levels):
            lg.removeHandler(self)
            lg.setLevel(level)


# --------------------------------------------------------------------------------------------
# kill -9 during a checkpoint save, then --resume (evidence; items 3 and 6)

KILLABLE_LAUNCHER = '''
import io, os, time
import d2kd.checkpoint as checkpoint

stall_on = os.environ.get("STALL_SAVE_OF")
if stall_on:  # test hook: write half of that checkpoint, say so, and hang until killed
    real_atomic_write = checkpoint.atomic_write

    def stalling_atomic_write(path, content):
        if os.path.basename(path) != stall_on:
            return real_atomic_write(path, content)

        def half(f):
            buffer = io.BytesIO()
            content(buffer)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            open(os.environ["SAVE_STARTED"], "w").close()
            time.sleep(600)

        return real_atomic_write(path, half)

    checkpoint.atomic_write = stalling_atomic_write

from d2kd.train_net import invoke_main

if __name__ == "__main__":
    invoke_main()
'''


def test_kill_9_during_a_checkpoint_save_then_resume(tmp_path, shapes_cache):
    cfg = gk_cfg(tmp_path, max_iter=6)  # checkpoints after iterations 1, 3, 5; bank built at 0
    config_file = write_yaml(cfg, tmp_path / "gk.yaml")
    launcher = tmp_path / "launcher.py"
    launcher.write_text(KILLABLE_LAUNCHER)
    started = tmp_path / "save_started"
    env = dict(os.environ, D2KD_CACHE=str(shapes_cache), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(launcher), "--config-file", config_file],
        env=dict(env, STALL_SAVE_OF="model_0000003.pth", SAVE_STARTED=str(started)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(tmp_path),
    )
    deadline = time.time() + 240
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no save"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    out = cfg.OUTPUT_DIR
    # the kill left a half-written temporary; the last complete checkpoint is still the one named
    assert os.path.exists(os.path.join(out, f"model_0000003.pth.tmp.{proc.pid}"))
    assert not os.path.exists(os.path.join(out, "model_0000003.pth"))
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000001.pth"
    saved = torch.load(os.path.join(out, "model_0000001.pth"), weights_only=True)
    saved_bank = {k: v for k, v in saved["model"].items() if k.startswith("prototype_bank.")}
    assert saved_bank["prototype_bank.num_builds"].item() == 1 and saved_bank["prototype_bank.valid_s8"].any()

    resumed = subprocess.run(
        [sys.executable, str(launcher), "--config-file", config_file, "--resume"],
        env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "Starting training from iteration 2" in log  # last complete checkpoint + 1
    assert "Removed 1 temporary file(s)" in log
    assert not glob.glob(os.path.join(out, "*.tmp.*")), os.listdir(out)
    assert "Prototype build at iteration" not in log  # restored, not rebuilt (PERIOD 0)
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert final["iteration"] == 5
    for k, v in saved_bank.items():
        assert torch.equal(final["model"][k], v), k


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from d2kd.utils.atomic import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"model_0000009.pth.tmp.{dead.pid}").write_bytes(b"half")
    (tmp_path / f"last_checkpoint.tmp.{dead.pid}").write_text("x")
    (tmp_path / f"model_0000010.pth.tmp.{os.getppid()}").write_bytes(b"a live writer")
    (tmp_path / f"model_0000011.pth.tmp.{os.getpid()}").write_bytes(b"this process")
    (tmp_path / "model_0000001.pth").write_bytes(b"complete")
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(removed) == sorted([f"model_0000009.pth.tmp.{dead.pid}", f"last_checkpoint.tmp.{dead.pid}"])
    assert sorted(os.listdir(tmp_path)) == sorted([
        "model_0000001.pth", f"model_0000010.pth.tmp.{os.getppid()}", f"model_0000011.pth.tmp.{os.getpid()}"])


def test_the_trainer_removes_stale_temporaries_at_start_up(tmp_path, shapes_cache):
    from d2kd.engine import DistillTrainer

    cfg = training_cfg(tmp_path, max_iter=1)
    os.makedirs(cfg.OUTPUT_DIR)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(cfg.OUTPUT_DIR, f"model_0000001.pth.tmp.{dead.pid}")
    open(stale, "wb").write(b"half a checkpoint")
    DistillTrainer(cfg)
    assert not os.path.exists(stale)


# --------------------------------------------------------------------------------------------
# Item 3: a bank that does not fit the config is rebuilt at once, with a warning


def test_resume_with_another_prototype_num_rebuilds_the_bank_with_a_warning(tmp_path, shapes_cache):
    from d2kd.engine import DistillTrainer

    cfg = gk_cfg(tmp_path, max_iter=2, NUM=3)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.model.prototype_bank.num_builds.item() == 1

    cfg.defrost()
    cfg.DISTILL.PROTOTYPES.NUM = 2
    cfg.SOLVER.MAX_ITER = 3
    resumed = DistillTrainer(cfg)
    with Records("d2kd") as logs:
        resumed.resume_or_load(resume=True)
        bank = resumed.model.prototype_bank
        assert resumed.start_iter == 2
        assert not bank.is_built  # not "built" with zero valid prototypes
        assert re.search(r"prototype bank does not fit .*DISTILL.PROTOTYPES.NUM", logs.text(logging.WARNING))
        resumed.train()  # PERIOD 0, and still rebuilt: at the first step after the resume
    assert bank.num_builds.item() == 1 and bank.valid_s8.shape[1] == 2
    assert bank.valid_s8.any()
    assert "Rebuilding the prototype bank at iteration 2" in logs.text(logging.WARNING)


def test_a_bank_that_does_not_fit_is_never_half_loaded():
    from d2kd.checkpoint import AtomicDetectionCheckpointer
    from d2kd.prototypes.bank import PrototypeBank

    old = PrototypeBank([8, 16], {8: 4, 16: 4}, {8: 6, 16: 6}, num_classes=2, num_prototypes=3)
    old.set_class(8, 0, torch.ones(3, 4), torch.ones(3, 6))
    old.num_builds += 1
    holder = torch.nn.Module()
    holder.prototype_bank = old
    state = {"model": holder.state_dict()}
    for strides, num in (([8, 16], 2), ([8, 16, 32], 3)):  # another NUM; another STRIDES
        new = PrototypeBank(strides, {s: 4 for s in strides}, {s: 6 for s in strides}, num_classes=2,
                            num_prototypes=num)
        target = torch.nn.Module()
        target.prototype_bank = new
        with Records("d2kd") as logs:
            AtomicDetectionCheckpointer(target)._load_model({k: dict(v) for k, v in state.items()})
        assert not new.is_built and not new.valid_s8.any()
        assert "does not fit" in logs.text(logging.WARNING) and new.rebuild_reason
    # a bank that fits is restored as it was
    same = PrototypeBank([8, 16], {8: 4, 16: 4}, {8: 6, 16: 6}, num_classes=2, num_prototypes=3)
    target = torch.nn.Module()
    target.prototype_bank = same
    AtomicDetectionCheckpointer(target)._load_model({k: dict(v) for k, v in state.items()})
    assert same.is_built and torch.equal(same.student_s8, old.student_s8) and not same.rebuild_reason


# --------------------------------------------------------------------------------------------
# Items 4 and 12: d2kd's log lines under train_net.py, a loud empty build, no colour codes


def test_train_net_shows_d2kd_logs_warns_on_an_empty_bank_and_writes_no_colour_codes(tmp_path, shapes_cache):
    cfg = gk_cfg(tmp_path, max_iter=1, MIN_SIZE=1000)  # larger than every box: an empty bank
    config_file = write_yaml(cfg, tmp_path / "gk.yaml")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_file],
        env=dict(os.environ, D2KD_CACHE=str(shapes_cache), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(os.path.join(cfg.OUTPUT_DIR, "log.txt")) as f:
        log_file = f.read()
    for text in (proc.stdout, log_file):
        assert "Loaded teacher weights from" in text
        assert "Prototype build at iteration 0: 0 images, 0 instances" in text
        assert re.search(r"WARNING.*THE PROTOTYPE BANK BUILT AT ITERATION 0 IS EMPTY.*MIN_SIZE=1000", text)
        assert "\x1b" not in text  # stdout is a pipe: no ANSI colour codes, as detectron2 does
    assert "\x1b" not in proc.stderr
    assert "index_reduce" not in proc.stdout + proc.stderr


def test_a_build_that_leaves_classes_without_prototypes_says_which():
    from d2kd.engine.prototype_refresh import build_report
    from d2kd.prototypes.bank import PrototypeBank

    bank = PrototypeBank([8, 16], {8: 4, 16: 4}, {8: 4, 16: 4}, num_classes=3, num_prototypes=2)
    bank.set_class(8, 0, torch.ones(2, 4), torch.ones(2, 4))
    bank.set_class(16, 0, torch.ones(1, 4), torch.ones(1, 4))
    bank.set_class(8, 1, torch.ones(1, 4), torch.ones(1, 4))
    features = {8: {0: (torch.ones(5, 4), torch.ones(5, 4), torch.zeros(5, 5)),
                    1: (torch.ones(1, 4), torch.ones(1, 4), torch.zeros(1, 5))},
                16: {0: (torch.ones(5, 4), torch.ones(5, 4), torch.zeros(5, 5))}}
    message, warnings = build_report(bank, features, 7, 0.5, 250, 8, ["circle", "square", "star"])
    assert "Prototype build at iteration 250: 7 images, 6 instances" in message
    assert "0 (circle)" in message and "5 -> 2" in message and "5 -> 1" in message
    assert len(warnings) == 1 and "left 1 of 3 classes without any prototype: 2 (star)" in warnings[0]
    bank.set_class(16, 0, torch.ones(0, 4), torch.ones(0, 4))
    _, warnings = build_report(bank, features, 7, 0.5, 250, 8)
    assert any("stride(s) [16] without any prototype" in w for w in warnings)


# --------------------------------------------------------------------------------------------
# Item 11: each build is logged and counted as hook time


def test_a_prototype_build_is_logged_and_counted_as_hook_time(tmp_path, shapes_cache, monkeypatch):
    from d2kd.engine import DistillTrainer
    from d2kd.engine.prototype_refresh import PrototypeRefreshHook

    cfg = gk_cfg(tmp_path, max_iter=5, START_ITER=3)  # after detectron2's 3 timing warm-up steps
    refresh = PrototypeRefreshHook.refresh

    def slow_refresh(self, iteration):
        time.sleep(1.5)
        return refresh(self, iteration)

    monkeypatch.setattr(PrototypeRefreshHook, "refresh", slow_refresh)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with Records("d2kd", "detectron2") as logs:
        trainer.train()
    text = logs.text()
    assert re.search(r"Prototype build at iteration 3: \d+ images, \d+ instances, [\d.]+s", text)
    assert "stride 8: instances -> prototypes" in text
    hooks = re.search(r"Total training time: [\d:]+ \((\d+):(\d+):(\d+) on hooks\)", text)
    assert hooks and int(hooks.group(3)) >= 1, text[-2000:]
    step_times = dict((it, v) for v, it in trainer.storage.history("time").values())
    assert step_times[3] < 1.0  # the build is not in the iteration's time


# --------------------------------------------------------------------------------------------
# Item 5 and "also": divergence and a missing image during a build


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_non_finite_features_in_a_build_name_model_stride_class_iteration(side):
    from d2kd.engine.prototype_refresh import rebuild_bank
    from d2kd.prototypes.bank import PrototypeBank

    bank = PrototypeBank([8, 16], {8: 4, 16: 4}, {8: 4, 16: 4}, num_classes=3, num_prototypes=2)
    good = (torch.randn(6, 4), torch.randn(6, 4), torch.zeros(6, 5))
    bad = [t.clone() for t in good]
    bad[0 if side == "student" else 1][2, 1] = float("nan")
    features = {8: {0: good, 2: tuple(good)}, 16: {0: good, 2: tuple(bad)}}
    with pytest.raises(FloatingPointError) as err:
        rebuild_bank(bank, features, alpha=10.0, iteration=250, class_names=["a", "b", "star"])
    msg = str(err.value)
    assert f"the {side}'s instance features of class 2 (star) at stride 16" in msg
    assert "at iteration 250" in msg
    assert ("training diverged" in msg) == (side == "student")
    assert not bank.is_built and not bank.valid_s8.any()  # nothing half-written


def test_a_missing_image_during_a_refresh_names_the_file_and_the_dataset(tmp_path):
    from d2kd.data import generate_shapes_split
    from d2kd.engine.prototype_refresh import PrototypeRefreshHook
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    data = tmp_path / "mine"
    generate_shapes_split(str(data), "train", 4, seed=3, image_size=64)
    name = f"missing_image_train_{os.getpid()}"
    register_coco_instances(name, {}, str(data / "train.json"), str(data / "train"))
    try:
        cfg = gk_cfg(tmp_path, max_iter=1)
        cfg.DATASETS.TRAIN = (name,)
        hook = PrototypeRefreshHook(cfg)
        first, _ = hook.images()[0]
        missing = hook._dataset[first]["file_name"]
        os.remove(missing)
        with pytest.raises(FileNotFoundError) as err:
            next(hook._batches(hook.images()))
        assert missing in str(err.value) and name in str(err.value)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# --------------------------------------------------------------------------------------------
# Item 9: own VOC-format data with own class names, evaluated through train_net.py

VOC_CLASSES = ["apple", "pear"]


def write_voc_set(root, ids=("a1", "a2", "b1", "b2"), size=64):
    """A tiny Pascal VOC-format set: JPEGImages, Annotations (with the fields detectron2's VOC
    evaluator reads), ImageSets/Main/test.txt."""
    import cv2
    import numpy as np

    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    rng = np.random.default_rng(0)
    for n, image_id in enumerate(ids):
        image = (rng.random((size, size, 3)) * 60).astype("uint8")
        cls = VOC_CLASSES[n % 2]
        x0, y0, x1, y1 = 10 + n, 12, 40 + n, 50
        image[y0:y1, x0:x1] = (40, 200, 40) if cls == "apple" else (200, 200, 40)
        cv2.imwrite(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), image)
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(
                f"<annotation><folder>mine</folder><filename>{image_id}.jpg</filename>"
                f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"
                f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>"
                f"<difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
                f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>"
            )
    with open(os.path.join(root, "ImageSets", "Main", "test.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def _voc_launcher(tmp_path):
    root = tmp_path / "myvoc"
    write_voc_set(str(root))
    launcher = tmp_path / "my_train_net.py"
    launcher.write_text(
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "from detectron2.data.datasets import register_pascal_voc\n"
        "from detectron2.data.datasets.pascal_voc import load_voc_instances\n"
        "from d2kd.train_net import invoke_main\n"
        f"register_pascal_voc('myvoc_test', '{root}', 'test', 2012, class_names={VOC_CLASSES!r})\n"
        "# a dataset registered by hand, without evaluator metadata\n"
        f"DatasetCatalog.register('bare_test', lambda: load_voc_instances('{root}', 'test', {VOC_CLASSES!r}))\n"
        f"MetadataCatalog.get('bare_test').thing_classes = {VOC_CLASSES!r}\n"
        "if __name__ == '__main__':\n"
        "    invoke_main()\n"
    )
    cfg = detector_cfg(num_classes=len(VOC_CLASSES))
    cfg.DATASETS.TRAIN = ("myvoc_test",)
    cfg.DATASETS.TEST = ("myvoc_test",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.MODEL.WEIGHTS = str(tmp_path / "plain.pth")
    save_plain_model(cfg, cfg.MODEL.WEIGHTS)
    return launcher, cfg


def _run(launcher, config_file, *opts, cwd):
    return subprocess.run(
        [sys.executable, str(launcher), "--config-file", config_file, "--eval-only", *opts],
        cwd=str(cwd), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )


def test_own_voc_dataset_is_evaluated_through_train_net_eval_only(tmp_path):
    launcher, cfg = _voc_launcher(tmp_path)
    config_file = write_yaml(cfg, tmp_path / "voc.yaml")
    proc = _run(launcher, config_file, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Evaluating myvoc_test using 2012 metric" in log
    assert re.search(r"copypaste: AP,AP50,AP75\n.*copypaste: [\d.]+,[\d.]+,[\d.]+", log)
    assert "No evaluator found" not in log


def test_a_dataset_without_an_evaluator_is_a_non_zero_exit_naming_it_and_the_fix(tmp_path):
    launcher, cfg = _voc_launcher(tmp_path)
    cfg.DATASETS.TEST = ("bare_test",)
    config_file = write_yaml(cfg, tmp_path / "bare.yaml")
    proc = _run(launcher, config_file, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "NoEvaluatorError: no evaluator for dataset 'bare_test'" in log
    assert "register_pascal_voc" in log and "evaluator_type" in log and "datasets/README.md" in log


def test_the_voc_evaluator_is_chosen_from_voc_registration_metadata(tmp_path):
    from d2kd.engine.trainer import NoEvaluatorError, build_evaluator
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import register_pascal_voc
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    write_voc_set(str(tmp_path / "voc"))
    register_pascal_voc("unit_voc_2012", str(tmp_path / "voc"), "test", 2012, class_names=VOC_CLASSES)
    register_pascal_voc("unit_voc_2019", str(tmp_path / "voc"), "test", 2019, class_names=VOC_CLASSES)
    cfg = detector_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    assert MetadataCatalog.get("unit_voc_2012").get("evaluator_type", None) is None
    assert isinstance(build_evaluator(cfg, "unit_voc_2012"), PascalVOCDetectionEvaluator)
    with pytest.raises(NoEvaluatorError, match="year=2019.*2012"):
        build_evaluator(cfg, "unit_voc_2019")


def test_eval_only_of_a_distill_config_needs_no_teacher(tmp_path):
    launcher, cfg = _voc_launcher(tmp_path)
    cfg.MODEL.META_ARCHITECTURE = "DistillRCNN"
    cfg.DISTILL.HEADS = ["fitnet"]
    cfg.DISTILL.TEACHER.CONFIG_FILE = str(tmp_path / "no_such_teacher.yaml")
    cfg.DISTILL.TEACHER.WEIGHTS = ""
    config_file = write_yaml(cfg, tmp_path / "distill.yaml")
    proc = _run(launcher, config_file, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "copypaste: AP,AP50,AP75" in log
