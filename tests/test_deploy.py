"""Deployment export: the traced TorchScript student of Faster R-CNN, RetinaNet and GFL
predicts what the eager student predicts (other input sizes too), loads with torch alone, and
a mismatch publishes nothing."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from conftest import detector_cfg, write_yaml
from test_one_stage import gfl_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT = os.path.join(REPO, "tools", "export_student.py")


def _images(folder, sizes=((64, 80), (64, 80), (80, 64))):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(3)
    files = []
    for i, (h, w) in enumerate(sizes):
        path = os.path.join(folder, f"img{i}.png")
        cv2.imwrite(path, (rng.random((h, w, 3)) * 255).astype("uint8"))
        files.append(path)
    return files


def _plain(tmp_path, cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": model.state_dict(), "iteration": 3}, path)
    return path


def _gfl_cfg():
    cfg = gfl_cfg()
    cfg.MODEL.GFL.NORM = "BN"  # GroupNorm cannot normalise p7's 1 x 1 maps of these 64 px images
    return cfg


CONFIGS = {"faster_rcnn": lambda: detector_cfg("rcnn"), "retinanet": lambda: detector_cfg("retinanet"),
           "gfl": _gfl_cfg}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_torchscript_export_predicts_what_the_eager_student_predicts(arch, tmp_path):
    from d2kd.deploy import TorchScriptPredictor
    from d2kd.export import export_release, load_release_config, read_manifest

    cfg = CONFIGS[arch]()
    weights = _plain(tmp_path, cfg)
    images = _images(tmp_path / "imgs")
    result = export_release(cfg, weights, str(tmp_path / "release"), images=images, formats=["torchscript"])

    # checked twice before publishing: in this process and in a fresh one (without d2kd, except
    # for GFL, d2kd's own meta-architecture), on every image
    assert result.check["torchscript_max_difference"] <= 1e-4 and result.check["images"] == 3
    assert result.check["detections"] > 0 and result.check["d2kd_imported"] == (arch == "gfl")
    manifest = read_manifest(str(tmp_path / "release"))
    ts_name = os.path.basename(result.torchscript_path)
    assert manifest["torchscript"]["file"] == ts_name and ts_name in manifest["files"]
    assert manifest["torchscript"]["outputs"] == ["pred_boxes", "pred_classes", "scores", "image_size"]

    # a user's view: the release's config and its .ts against DefaultPredictor, on a size the
    # model was not traced at (the verification images' first one is 64 x 80)
    release_cfg = load_release_config(result.config_path)
    eager, traced = DefaultPredictor(release_cfg), TorchScriptPredictor(result.torchscript_path, release_cfg)
    image = (np.random.default_rng(9).random((96, 72, 3)) * 255).astype("uint8")
    a, b = eager(image)["instances"], traced(image)
    assert len(a) == len(b) > 0 and torch.equal(a.pred_classes, b.pred_classes)
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)


TORCH_ONLY = r'''
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("d2kd", "detectron2"):
            raise ImportError(name + " imported")

sys.meta_path.insert(0, Blocked())
import torch
import torchvision  # registers the nms / roi_align ops the graph calls
model = torch.jit.load(sys.argv[1])
boxes, classes, scores, size = model(torch.rand(3, 72, 96) * 255)
print("outputs", tuple(boxes.shape), tuple(classes.shape), tuple(scores.shape), size.tolist())
'''


def test_the_tool_exports_torchscript_that_loads_without_detectron2_or_d2kd(tmp_path):
    cfg = detector_cfg("rcnn")
    weights = _plain(tmp_path, cfg)
    config = write_yaml(cfg, tmp_path / "student.yaml")
    images = os.path.dirname(_images(tmp_path / "imgs")[0])
    proc = subprocess.run([sys.executable, EXPORT, "--config-file", config, "--weights", weights, "--output-dir",
                           str(tmp_path / "release"), "--format", "torchscript", "--images", images],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "verified: TorchScript predicts the same boxes, scores and classes" in proc.stdout
    ts = next(f for f in os.listdir(tmp_path / "release") if f.endswith(".ts"))
    alone = subprocess.run([sys.executable, "-c", TORCH_ONLY, str(tmp_path / "release" / ts)],
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert "outputs" in alone.stdout and "[72, 96]" in alone.stdout

    # torchscript without images to check it on is refused before anything is written
    cfg.DATASETS.TEST = ()
    no_images = subprocess.run([sys.executable, EXPORT, "--config-file", write_yaml(cfg, tmp_path / "s2.yaml"),
                                "--weights", weights, "--output-dir", str(tmp_path / "r2"), "--format", "torchscript"],
                               capture_output=True, text=True, timeout=300)
    assert no_images.returncode != 0 and "--dataset NAME or --images DIR" in no_images.stderr
    assert not (tmp_path / "r2").exists()


def test_a_traced_model_that_predicts_differently_is_not_published(tmp_path, monkeypatch):
    from d2kd import deploy
    from d2kd.export import ExportError, export_release

    cfg = detector_cfg("rcnn")
    weights = _plain(tmp_path, cfg)
    first = export_release(cfg, weights, str(tmp_path / "release"))
    before = sorted(os.listdir(tmp_path / "release"))
    real = deploy.trace_student

    def trace_a_perturbed_model(model, sample):
        with torch.no_grad():
            for p in model.roi_heads.box_predictor.parameters():
                p.add_(0.05)  # what a broken export path would do: other weights in the graph
        return real(model, sample)

    monkeypatch.setattr(deploy, "trace_student", trace_a_perturbed_model)
    with pytest.raises(ExportError, match="TorchScript student does not predict what the eager student predicts"):
        export_release(cfg, weights, str(tmp_path / "release"), images=_images(tmp_path / "imgs"),
                       formats=["torchscript"])
    assert sorted(os.listdir(tmp_path / "release")) == before  # the earlier release stays
    assert json.load(open(tmp_path / "release" / "release.json"))["torchscript"] is None
    assert os.path.basename(first.weights_path) in before
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]
