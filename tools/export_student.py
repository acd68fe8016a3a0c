#!/usr/bin/env python
"""Export a distilled student as a plain detectron2 model (weights + config).

    python tools/export_student.py --config-file configs/gk_faster_rcnn_R_50_FPN_2x_coco.yaml \
        --weights output/model_final.pth --output-dir release/ [--verify]

The release loads in stock detectron2 -- ``DefaultPredictor(cfg)`` with
``cfg.merge_from_file("release/config.yaml")`` -- with no d2kd import. ``--verify`` checks
exactly that: zero missing or unexpected keys, and the same predictions as the distillation
model on validation images.
"""
import argparse
import logging
import os
import sys

import cv2
import numpy as np
import torch

import d2kd  # noqa: F401
from d2kd.config import load_config
from d2kd.checkpoint import StrictDetectionCheckpointer
from d2kd.export import export_student
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger


def verify(distill_cfg, weights_path, config_path, num_images=8):
    """Stock detectron2 loads the release strictly and predicts what the distillation model does."""
    plain_cfg = get_cfg()  # stock detectron2: no DISTILL keys, no d2kd config
    plain_cfg.merge_from_file(config_path)
    plain_cfg.freeze()
    StrictDetectionCheckpointer(build_model(plain_cfg)).load(weights_path)  # raises on any mismatch

    released = DefaultPredictor(plain_cfg)
    original = DefaultPredictor(distill_cfg)
    dataset = distill_cfg.DATASETS.TEST[0] if distill_cfg.DATASETS.TEST else distill_cfg.DATASETS.TRAIN[0]
    records = DatasetCatalog.get(dataset)[:num_images]
    worst, detections = 0.0, 0
    for record in records:
        image = cv2.imread(record["file_name"])
        if image is None:
            raise FileNotFoundError(f"cannot read {record['file_name']} from {dataset}")
        a = original(image)["instances"].to("cpu")
        b = released(image)["instances"].to("cpu")
        if len(a) != len(b) or not torch.equal(a.pred_classes, b.pred_classes):
            raise AssertionError(f"different detections on {record['file_name']}: {len(a)} vs {len(b)}")
        if len(a):
            worst = max(worst, (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max().item(),
                        (a.scores - b.scores).abs().max().item())
        detections += len(a)
    if worst > 1e-4:
        raise AssertionError(f"predictions differ by up to {worst:g}")
    return len(records), detections, worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the distillation config used for training")
    parser.add_argument("--weights", help="distillation checkpoint (default: OUTPUT_DIR/model_final.pth)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--name", default="model_final", help="file name stem of the weights")
    parser.add_argument("--verify", action="store_true", help="check the release in stock detectron2")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="d2kd")
    logger = logging.getLogger("d2kd")

    cfg = load_config(args.config_file, args.opts)
    weights = args.weights or os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if not os.path.isfile(weights):
        sys.exit(f"export_student: the checkpoint {weights} does not exist (pass --weights)")
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()

    weights_path, config_path = export_student(cfg, weights, args.output_dir, args.name)
    print(f"weights: {weights_path}\nconfig:  {config_path}")
    if args.verify:
        n, dets, worst = verify(cfg, weights_path, config_path)
        print(f"verified: stock detectron2 loads it with no missing or unexpected keys; "
              f"{n} images, {dets} detections, max difference {worst:.2g}")
    return weights_path, config_path


if __name__ == "__main__":
    main()
