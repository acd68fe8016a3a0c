"""d2kd's model zoo as a user meets it: a zoo published into a folder, served over HTTP from
127.0.0.1, a distilled student trained from a ``d2kd://`` teacher, ``model_zoo.get(...,
trained=True)`` predicting, downloads cached once, and corrupt files refused."""
import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.utils.file_io import PathManager

from conftest import detector_cfg, training_cfg, write_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAME = "tests/tiny_faster_rcnn"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, shapes_cache):
    """A zoo folder holding one published model: a tiny Faster R-CNN trained 2 iterations on
    the built-in data (the teacher of the distillation test below)."""
    from d2kd.data import ensure_shapes_generated
    from d2kd.engine import DistillTrainer

    root = tmp_path_factory.mktemp("zoo")
    cfg = detector_cfg("rcnn", fpn_channels=32, num_classes=6)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("d2kd_shapes_train",), ("d2kd_shapes_val",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 2, 0.001, 2
    cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = (), 0, 100
    cfg.OUTPUT_DIR = str(root / "train")
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    ensure_shapes_generated("d2kd_shapes_val")
    from detectron2.data import DatasetCatalog

    images = [r["file_name"] for r in DatasetCatalog.get("d2kd_shapes_val")[:2]]
    # published as a user does: the tool, its metrics file, timed on 2 validation images
    metrics = root / "train" / "final_results.json"
    metrics.write_text(json.dumps({"AP": 1.5, "AP50": 3.0, "APl": float("nan")}))
    (root / "train" / "train_time.json").write_text(json.dumps({"seconds": 12.0}))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "export_student.py"), "--config-file",
         write_yaml(cfg, root / "tiny.yaml"), "--weights", str(root / "train" / "model_final.pth"),
         "--zoo", str(root / "zoo"), "--zoo-name", NAME + ".yaml", "--num-images", "2", "--latency-images", "2"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, D2KD_CACHE=str(shapes_cache)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"published: {NAME} into the zoo" in proc.stdout and "verified: TorchScript predicts" in proc.stdout
    entry = json.load(open(root / "zoo" / "index.json"))["models"][NAME]
    return {"dir": str(root / "zoo"), "entry": entry, "cfg": cfg, "images": images}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        return super().do_GET()


@pytest.fixture
def served(zoo, tmp_path, monkeypatch):
    """The zoo folder served by a real HTTP server on 127.0.0.1 (an ephemeral port), the zoo
    base pointed at it, and a fresh download cache."""
    _QuietHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=zoo["dir"]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("D2KD_ZOO", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    yield dict(zoo, requests=_QuietHandler.requests, cache=str(tmp_path / "cache"))
    server.shutdown()
    server.server_close()


def test_publish_writes_a_verified_release_the_index_and_the_table(zoo):
    entry, folder = zoo["entry"], os.path.join(zoo["dir"], NAME)
    weights, ts = entry["weights"], entry["torchscript"]
    assert weights.startswith("tiny_faster_rcnn_") and weights.endswith(".pth")
    assert weights[-10:-4] == entry["md5"][:6] and ts.endswith(".ts")
    assert sorted(os.listdir(folder)) == sorted(["config.yaml", "release.json", weights, ts])
    index = json.load(open(os.path.join(zoo["dir"], "index.json")))
    assert index["format"] == "d2kd-zoo/1" and index["models"][NAME] == entry
    assert entry["metrics"] == {"AP": 1.5, "AP50": 3.0, "APl": None}  # COCOeval's NaN as null
    assert entry["params"] > 0 and entry["gflops"] > 0 and entry["train_time_s"] == 12.0
    assert entry["check"]["max_difference"] == 0 and entry["check"]["torchscript_max_difference"] <= 1e-4
    table = open(os.path.join(zoo["dir"], "MODEL_ZOO.md")).read()
    assert f"| `{NAME}` |" in table and entry["md5"][:8] in table and "| 12s |" in table
    assert "`gk_faster_r50.yaml` | COCO (alias) | to be trained |" in table


def test_the_payoff_of_a_published_model_is_timed_as_a_consumer_loads_it(zoo):
    from d2kd.model_zoo.payoff import payoff_table

    latency = zoo["entry"]["latency_ms"]  # --latency-images 2
    for kind in ("eager", "torchscript"):
        for threads in ("1", "2"):
            stats = latency[kind][threads]
            assert stats["n"] == 2 and 0 < stats["q1"] <= stats["median"] <= stats["q3"]
    table = payoff_table([("tiny", zoo["entry"])])
    assert table.splitlines()[0].startswith("| model | AP | AP50 | params | GFLOPs | 1 thread: eager ms |")
    assert f"| tiny | 1.5 | 3.0 | {zoo['entry']['params'] / 1e6:.2f} M |" in table


def test_a_distilled_student_trains_from_a_teacher_served_as_d2kd_uri(served, tmp_path):
    from d2kd import model_zoo
    from d2kd.engine import DistillTrainer

    url = model_zoo.get_checkpoint_url(NAME + ".yaml")
    assert url == f"d2kd://{NAME}/{served['entry']['weights']}"
    cfg = training_cfg(tmp_path, heads=["fitnet"], max_iter=2)
    cfg.DISTILL.TEACHER.CONFIG_FILE = f"d2kd://{NAME}/config.yaml"  # the teacher's own release config
    cfg.DISTILL.TEACHER.WEIGHTS = url
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    cached = [os.path.join(d, f) for d, _, files in os.walk(served["cache"]) for f in files
              if f == served["entry"]["weights"]]
    assert len(cached) == 1, "downloaded into the cache"
    weights_gets = [r for r in served["requests"] if r.endswith(".pth")]
    assert len(weights_gets) == 1

    # a second model from the same URI: the weights come from the cache, not the server
    (tmp_path / "again").mkdir()
    again = training_cfg(tmp_path / "again", heads=["fitnet"], max_iter=1)
    again.DISTILL.TEACHER.CONFIG_FILE, again.DISTILL.TEACHER.WEIGHTS = cfg.DISTILL.TEACHER.CONFIG_FILE, url
    DistillTrainer.build_model(again)
    assert [r for r in served["requests"] if r.endswith(".pth")] == weights_gets


def test_model_zoo_get_trained_predicts_as_the_published_release(served):
    from d2kd import model_zoo
    from d2kd.deploy import test_time_input
    from d2kd.export import load_release_config

    model = model_zoo.get(NAME, trained=True).eval()
    release_cfg = load_release_config(os.path.join(served["dir"], NAME, "config.yaml"))
    local = DefaultPredictor(release_cfg)
    image = cv2.imread(served["images"][0])
    height, width = image.shape[:2]
    with torch.no_grad():  # DefaultPredictor's input: the config's test-time resize
        got = model([{"image": test_time_input(image, release_cfg), "height": height, "width": width}])[0]["instances"]
    want = local(image)["instances"]
    assert len(got) == len(want) > 0
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor) and torch.equal(got.scores, want.scores)
    # the untrained model of a shipped distillation config is its student, initialised as configured
    student = model_zoo.get("shapes/gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml", trained=False)
    assert type(student).__name__ == "GeneralizedRCNN"


def test_a_corrupt_or_missing_file_on_the_server_is_refused_and_nothing_is_cached(served, tmp_path):
    from d2kd.model_zoo import ZooFileError

    weights = os.path.join(served["dir"], NAME, served["entry"]["weights"])
    good = open(weights, "rb").read()
    try:
        with open(weights, "wb") as f:  # truncated on the server, same name
            f.write(good[: len(good) // 2])
        uri = f"d2kd://{NAME}/{served['entry']['weights']}"
        with pytest.raises(ZooFileError, match=r"corrupt or truncated \(nothing was cached\)") as err:
            PathManager.get_local_path(uri)
        assert served["entry"]["weights"] in str(err.value) and "its name says" in str(err.value)
        left = [f for _, _, files in os.walk(served["cache"]) for f in files if not f.endswith(".lock")]
        assert left == [], "no half-written file in the cache"
        with pytest.raises(ValueError, match="DISTILL.TEACHER.WEIGHTS = .* could not be fetched: .*corrupt or truncated"):
            from d2kd.engine import DistillTrainer

            cfg = training_cfg(tmp_path, heads=["fitnet"], max_iter=1)
            cfg.DISTILL.TEACHER.CONFIG_FILE, cfg.DISTILL.TEACHER.WEIGHTS = f"d2kd://{NAME}/config.yaml", uri
            DistillTrainer.build_model(cfg)
    finally:
        with open(weights, "wb") as f:
            f.write(good)
    with pytest.raises(ZooFileError, match="answered HTTP 404"):
        PathManager.get_local_path(f"d2kd://{NAME}/no_such_model_abcdef.pth")


def test_a_local_zoo_folder_checks_md5_and_names_what_it_has(zoo, monkeypatch, tmp_path):
    import shutil

    from d2kd import model_zoo
    from d2kd.model_zoo import ZooFileError

    copy = tmp_path / "zoo"
    shutil.copytree(zoo["dir"], copy)
    monkeypatch.setenv("D2KD_ZOO", str(copy))
    local = PathManager.get_local_path(model_zoo.get_checkpoint_url(NAME))
    assert local == str(copy / NAME / zoo["entry"]["weights"])
    with open(local, "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 8)  # a corrupted byte range
    with pytest.raises(ZooFileError, match="corrupt or truncated"):
        PathManager.get_local_path(model_zoo.get_checkpoint_url(NAME))
    with pytest.raises(RuntimeError, match=rf"has no trained model for shapes/x.yaml \(it has: {NAME}\)"):
        model_zoo.get_checkpoint_url("shapes/x.yaml")
    with pytest.raises(RuntimeError, match="did you mean .*shapes/gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml"):
        model_zoo.get_config_file("shapes/gk_faster_rcnn_R_18_FPN_1k_shapes.yaml")
    assert model_zoo.get_config_file("gk_faster_r50.yaml").endswith(os.path.join("configs", "gk_faster_r50.yaml"))


def test_model_zoo_md_lists_the_published_models_and_every_shipped_config_to_be_trained():
    """MODEL_ZOO.md (generated by tools/model_zoo_table.py from a make demo zoo) names the three
    built-in-data models with their md5-named files, and every COCO/VOC config as to be trained."""
    import glob
    import re

    text = open(os.path.join(REPO, "MODEL_ZOO.md")).read()
    for name in ("faster_rcnn_R_18_FPN_1k_shapes", "faster_rcnn_R_18_half_FPN_1k_shapes",
                 "gk_faster_rcnn_R_18_half_FPN_1k_shapes"):
        assert re.search(rf"\| `shapes/{name}` \|.*\[{name}_[0-9a-f]{{6}}\.pth\]", text), name
    configs = os.path.join(REPO, "configs")
    for path in glob.glob(os.path.join(configs, "**", "*.yaml"), recursive=True):
        name = os.path.relpath(path, configs)
        if not os.path.basename(name).startswith("Base-") and not name.startswith("shapes"):
            assert f"| `{name}` |" in text and "to be trained" in text, f"{name} missing from MODEL_ZOO.md"
