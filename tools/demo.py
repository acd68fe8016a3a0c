#!/usr/bin/env python
"""The main job on built-in data (``make demo``): teacher -> student alone -> distilled student.

Trains a teacher on the built-in ``d2kd_shapes`` data (once) and, side by side with it, the
student alone (one CPU thread each); then distils
the student from the teacher with GK, evaluates all three with detectron2's COCO evaluator,
prints a table and writes a PNG of the three models' detections on the same validation images.
Finished stages are reused; an interrupted stage resumes from its last checkpoint.

    python tools/demo.py [--output-dir output/demo] [--seed 0]
"""
import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import d2kd  # noqa: E402,F401
from d2kd.config import load_config  # noqa: E402
from d2kd.data import ensure_shapes_generated  # noqa: E402
from d2kd.utils.experiment import comparison_table, run_comparison  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "shapes")
TEACHER = os.path.join(CONFIGS, "faster_rcnn_R_18_FPN_1k_shapes.yaml")
STUDENT = os.path.join(CONFIGS, "faster_rcnn_R_18_half_FPN_1k_shapes.yaml")
DISTILLED = os.path.join(CONFIGS, "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_logger(name="detectron2")
    setup_logger(name="d2kd")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()

    for split in ("d2kd_shapes_train", "d2kd_shapes_val"):  # once, before stages run side by side
        ensure_shapes_generated(split)
    teacher, student, distilled, teacher_weights = run_comparison(
        TEACHER, STUDENT, DISTILLED, args.output_dir, args.seed)

    from d2kd.utils.visualize import detections_side_by_side

    models = []
    for title, config, stage in (
        ("teacher", TEACHER, "teacher_seed0"),
        ("student alone", STUDENT, f"student_seed{args.seed}"),
        ("distilled (GK)", DISTILLED, f"gk_seed{args.seed}"),
    ):
        opts = ["MODEL.WEIGHTS", os.path.join(args.output_dir, stage, "model_final.pth"),
                "DISTILL.TEACHER.WEIGHTS", teacher_weights]
        models.append((title, load_config(config, opts)))
    val = DatasetCatalog.get("d2kd_shapes_val")
    png = detections_side_by_side(models, [r["file_name"] for r in val[:4]], "d2kd_shapes_val",
                                  os.path.join(args.output_dir, "detections.png"))

    print("\n" + comparison_table(teacher, student, distilled))
    print(f"\ndetections of the three models on the same validation images: {png}")
    print(f"total time: {(time.time() - start) / 60:.1f} min (finished stages are reused on the next run)")


if __name__ == "__main__":
    sys.exit(main())
