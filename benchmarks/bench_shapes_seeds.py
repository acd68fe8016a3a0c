#!/usr/bin/env python
"""The demo's comparison over several seeds, for every method: is the gain real?

    python benchmarks/bench_shapes_seeds.py --seeds 0 1 2 --methods gk fitnet kd

One teacher (seed 0) is trained once and shared, as a released teacher would be; the student
alone and each distilled student are trained once per seed. Prints mean +- sample std of COCO
AP per model, and each method's gain over the student alone against the seed-to-seed spread.
Stages are reused from --output-dir (default output/bench_shapes), so an interrupted run resumes.
"""
import argparse
import os
import statistics

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import d2kd  # noqa: E402,F401
from d2kd.experiment import run_comparison  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "shapes")
TEACHER = os.path.join(CONFIGS, "faster_rcnn_teacher_shapes.yaml")
STUDENT = os.path.join(CONFIGS, "faster_rcnn_student_shapes.yaml")
METHOD_CONFIGS = {
    "gk": os.path.join(CONFIGS, "gk_faster_rcnn_shapes.yaml"),
    "fitnet": os.path.join(CONFIGS, "fitnet_faster_rcnn_shapes.yaml"),
    "kd": os.path.join(CONFIGS, "kd_faster_rcnn_shapes.yaml"),
}


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["gk", "fitnet", "kd"], choices=sorted(METHOD_CONFIGS))
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "bench_shapes"))
    args = parser.parse_args()
    setup_logger(name="detectron2")
    setup_logger(name="d2kd")
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    teacher_ap, student_ap, method_ap = None, {}, {m: {} for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            teacher, student, distilled, _ = run_comparison(
                TEACHER, STUDENT, METHOD_CONFIGS[method], args.output_dir, seed, distill_name=method)
            teacher_ap, student_ap[seed], method_ap[method][seed] = teacher["AP"], student["AP"], distilled["AP"]

    s_mean, s_std = mean_std(list(student_ap.values()))
    print(f"\nCOCO AP on d2kd_shapes_val, seeds {args.seeds} (teacher: one run, seed 0)\n")
    print("| model | AP mean +- std | per seed | gain over student |")
    print("|---|---|---|---|")
    print(f"| teacher | {teacher_ap:.2f} | - | - |")
    print(f"| student alone | {s_mean:.2f} +- {s_std:.2f} | {', '.join(f'{student_ap[s]:.2f}' for s in args.seeds)} | - |")
    for method in args.methods:
        values = [method_ap[method][s] for s in args.seeds]
        m, sd = mean_std(values)
        gains = [method_ap[method][s] - student_ap[s] for s in args.seeds]
        g, gsd = mean_std(gains)
        print(f"| {method} | {m:.2f} +- {sd:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {g:+.2f} +- {gsd:.2f} |")


if __name__ == "__main__":
    main()
