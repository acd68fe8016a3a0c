#!/usr/bin/env python
"""The main job on built-in data (``make demo``): teacher -> student alone -> distilled student.

Trains a teacher on the built-in ``d2kd_shapes`` data (once), trains the student alone, distils
the student from the teacher with GK, evaluates all three with detectron2's COCO evaluator,
prints a table and writes a PNG of the three models' detections on the same validation images.
Finished stages are reused; an interrupted stage resumes from its last checkpoint.

    python tools/demo.py [--output-dir output/demo] [--seed 0]
"""
import argparse
import logging
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import d2kd  # noqa: E402,F401
from d2kd.config import load_config  # noqa: E402
from d2kd.experiment import train_and_evaluate  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "shapes")
TEACHER = os.path.join(CONFIGS, "faster_rcnn_teacher_shapes.yaml")
STUDENT = os.path.join(CONFIGS, "faster_rcnn_student_shapes.yaml")
DISTILLED = os.path.join(CONFIGS, "gk_faster_rcnn_shapes.yaml")


def run_comparison(output_dir: str, seed: int, teacher_seed: int = 0, distill_config: str = DISTILLED,
                   distill_opts=(), distill_name: str = "gk"):
    """Teacher (seed ``teacher_seed``), student alone and distilled student (seed ``seed``)."""
    teacher_dir = os.path.join(output_dir, f"teacher_seed{teacher_seed}")
    teacher = train_and_evaluate(TEACHER, teacher_dir, ["SEED", str(teacher_seed)])
    student = train_and_evaluate(STUDENT, os.path.join(output_dir, f"student_seed{seed}"), ["SEED", str(seed)])
    distilled = train_and_evaluate(
        distill_config,
        os.path.join(output_dir, f"{distill_name}_seed{seed}"),
        ["SEED", str(seed), "DISTILL.TEACHER.WEIGHTS", os.path.join(teacher_dir, "model_final.pth"),
         *distill_opts],
    )
    return teacher, student, distilled


def format_table(teacher, student, distilled, name="distilled (GK)") -> str:
    gain = distilled["AP"] - student["AP"]
    gap = teacher["AP"] - student["AP"]
    closed = f"{100 * gain / gap:.0f}%" if gap > 0 else "n/a"
    lines = [
        f"| model | AP | AP50 | AP75 |",
        f"|---|---|---|---|",
    ]
    for title, r in (("teacher", teacher), ("student alone", student), (name, distilled)):
        lines.append(f"| {title} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} |")
    lines.append("")
    lines.append(f"gain over the student alone: {gain:+.1f} AP; share of the teacher-student gap closed: {closed}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_logger(name="detectron2")
    setup_logger(name="d2kd")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()

    teacher, student, distilled = run_comparison(args.output_dir, args.seed)

    from d2kd.visualize import detections_side_by_side

    seed = args.seed
    models = []
    for title, config, stage in (
        ("teacher", TEACHER, "teacher_seed0"),
        ("student alone", STUDENT, f"student_seed{seed}"),
        ("distilled (GK)", DISTILLED, f"gk_seed{seed}"),
    ):
        weights = os.path.join(args.output_dir, stage, "model_final.pth")
        opts = ["MODEL.WEIGHTS", weights]
        if config == DISTILLED:
            opts += ["DISTILL.TEACHER.WEIGHTS", os.path.join(args.output_dir, "teacher_seed0", "model_final.pth")]
        models.append((title, load_config(config, opts)))
    val = DatasetCatalog.get("d2kd_shapes_val")
    png = detections_side_by_side(models, [r["file_name"] for r in val[:4]], "d2kd_shapes_val",
                                  os.path.join(args.output_dir, "detections.png"))

    print("\n" + format_table(teacher, student, distilled))
    print(f"\ndetections of the three models on the same validation images: {png}")
    print(f"total time: {(time.time() - start) / 60:.1f} min (finished stages are reused on the next run)")


if __name__ == "__main__":
    sys.exit(main())
