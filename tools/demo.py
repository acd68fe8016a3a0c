#!/usr/bin/env python
"""The main job on built-in data (``make demo``): teacher -> student alone -> distilled student.

Trains a teacher on the built-in ``d2kd_shapes`` data (once) and, side by side with it, the
student alone (one CPU thread each); then distils
the student from the teacher with GK, evaluates all three with detectron2's COCO evaluator,
prints a table and writes a PNG of the three models' detections on the same validation images.
Finished stages are reused; an interrupted stage resumes from its last checkpoint.

    python tools/demo.py [--output-dir output/demo] [--seed 0]

``--pair retinanet`` (``make demo-one-stage``) runs the one-stage pair instead: a RetinaNet
teacher (2000 iterations), the RetinaNet student alone and GK, under ``output/demo_retinanet``;
``--pair gfl`` the GFL pair with LD, under ``output/demo_gfl``.
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
from d2kd.utils.experiment import (  # noqa: E402
    SHAPES_PAIRS, add_threads_argument, comparison_table, run_comparison, set_cpu_threads)
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "shapes")
# pair (teacher and student alone: SHAPES_PAIRS) -> the distilled student's config and method
DISTILLED = {
    "faster_rcnn": ("gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml", "gk"),
    "retinanet": ("gk_retinanet_R_18_half_FPN_1k_shapes.yaml", "gk"),
    "gfl": ("ld_gfl_R_18_half_FPN_1k_shapes.yaml", "ld"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=sorted(DISTILLED), default="faster_rcnn")
    parser.add_argument("--output-dir", default=None,
                        help="default output/demo (faster_rcnn), output/demo_<pair> otherwise")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    args = parser.parse_args()
    if args.output_dir is None:
        args.output_dir = os.path.join(REPO, "output", "demo" if args.pair == "faster_rcnn" else f"demo_{args.pair}")
    distilled_file, method = DISTILLED[args.pair]
    teacher_config, student_config, distilled_config = (
        os.path.join(CONFIGS, f) for f in (*SHAPES_PAIRS[args.pair], distilled_file))
    distilled_title = f"distilled ({method.upper()})"
    setup_logger(name="detectron2")
    setup_logger(name="d2kd")
    set_cpu_threads(args.threads)
    start = time.time()

    for split in ("d2kd_shapes_train", "d2kd_shapes_val"):  # once, before stages run side by side
        ensure_shapes_generated(split)
    teacher, student, distilled, teacher_weights = run_comparison(
        teacher_config, student_config, distilled_config, args.output_dir, args.seed, distill_name=method)

    from d2kd.utils.visualize import detections_side_by_side

    models = []
    for title, config, stage in (
        ("teacher", teacher_config, "teacher_seed0"),
        ("student alone", student_config, f"student_seed{args.seed}"),
        (distilled_title, distilled_config, f"{method}_seed{args.seed}"),
    ):
        opts = ["MODEL.WEIGHTS", os.path.join(args.output_dir, stage, "model_final.pth"),
                "DISTILL.TEACHER.WEIGHTS", teacher_weights]
        models.append((title, load_config(config, opts)))
    val = DatasetCatalog.get("d2kd_shapes_val")
    png = detections_side_by_side(models, [r["file_name"] for r in val[:4]], "d2kd_shapes_val",
                                  os.path.join(args.output_dir, "detections.png"))

    print("\n" + comparison_table(teacher, student, distilled, distilled_title))
    print(f"\ndetections of the three models on the same validation images: {png}")
    print(f"total time: {(time.time() - start) / 60:.1f} min (finished stages are reused on the next run)")


if __name__ == "__main__":
    sys.exit(main())
