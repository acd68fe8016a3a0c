#!/usr/bin/env python
"""The demo's comparison over several seeds, for every method: is the gain real?

    python benchmarks/bench_shapes_seeds.py --seeds 0 1 2 --methods gk fitnet kd pkd fgfi defeat \
        defeat_rw kd_rw rkd rkd_global gk_pkd

One teacher (seed 0) is trained once and shared, as a released teacher would be; the student
alone and each distilled student are trained once per seed (stages run one per CPU core).
Prints mean +- sample std of COCO AP per model, and each method's gain over the student alone.
Stages are reused from --output-dir (default output/bench_shapes), so an interrupted run resumes.
"""
import argparse
import os
import statistics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import d2kd  # noqa: E402,F401
from d2kd.data import ensure_shapes_generated  # noqa: E402
from d2kd.utils.experiment import run_stages  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "shapes")
TEACHER = os.path.join(CONFIGS, "faster_rcnn_R_18_FPN_1k_shapes.yaml")
STUDENT = os.path.join(CONFIGS, "faster_rcnn_R_18_half_FPN_1k_shapes.yaml")
METHOD_CONFIGS = {
    name: os.path.join(CONFIGS, f"{file}_faster_rcnn_R_18_half_FPN_1k{variant}_shapes.yaml")
    for name, file, variant in [
        ("gk", "gk", ""), ("fitnet", "fitnet", ""), ("kd", "kd", ""), ("pkd", "pkd", ""),
        ("fgfi", "fgfi", ""), ("defeat", "defeat", ""), ("defeat_rw", "defeat", "_rw"),
        ("kd_rw", "kd", "_rw"), ("rkd", "rkd", ""), ("rkd_global", "rkd", "_global"),
        ("gk_pkd", "gk", "_withpkd"),
    ]
}


# The one-stage pair (--pair retinanet): RetinaNet R-18 -> R-18 half width, levels p2-p6.
RETINA_TEACHER = os.path.join(CONFIGS, "retinanet_R_18_FPN_1k_shapes.yaml")
RETINA_STUDENT = os.path.join(CONFIGS, "retinanet_R_18_half_FPN_1k_shapes.yaml")
RETINA_METHOD_CONFIGS = {
    "gk": os.path.join(CONFIGS, "gk_retinanet_R_18_half_FPN_1k_shapes.yaml"),
    "fitnet": os.path.join(CONFIGS, "fitnet_retinanet_R_18_half_FPN_1k_shapes.yaml"),
    "rm_pfi": os.path.join(CONFIGS, "rank_mimic_retinanet_R_18_half_FPN_1k_withpfi_shapes.yaml"),
}


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    global TEACHER, STUDENT, METHOD_CONFIGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["gk", "fitnet", "kd"],
                        choices=sorted(set(METHOD_CONFIGS) | set(RETINA_METHOD_CONFIGS)))
    parser.add_argument("--pair", choices=["faster_rcnn", "retinanet"], default="faster_rcnn")
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "bench_shapes"))
    args = parser.parse_args()
    setup_logger(name="detectron2")
    setup_logger(name="d2kd")
    for split in ("d2kd_shapes_train", "d2kd_shapes_val"):
        ensure_shapes_generated(split)

    if args.pair == "retinanet":
        TEACHER, STUDENT, METHOD_CONFIGS = RETINA_TEACHER, RETINA_STUDENT, RETINA_METHOD_CONFIGS
    unknown = [m for m in args.methods if m not in METHOD_CONFIGS]
    if unknown:
        parser.error(f"methods {unknown} have no config for the {args.pair} pair; choose from {sorted(METHOD_CONFIGS)}")
    out = args.output_dir
    teacher_dir = os.path.join(out, "teacher_seed0")
    students = [("student", STUDENT, os.path.join(out, f"student_seed{s}"), ["SEED", str(s)]) for s in args.seeds]
    # the teacher first (beside the first student): every distilled student needs it
    teacher, *_ = run_stages([("teacher", TEACHER, teacher_dir, ["SEED", "0"]), students[0]])
    teacher_weights = os.path.join(teacher_dir, "model_final.pth")
    distilled = [
        (m, METHOD_CONFIGS[m], os.path.join(out, f"{m}_seed{s}"),
         ["SEED", str(s), "DISTILL.TEACHER.WEIGHTS", teacher_weights])
        for s in args.seeds for m in args.methods
    ]
    results = run_stages(students + distilled)
    student_ap = [r["AP"] for r in results[: len(students)]]
    method_ap = {m: [] for m in args.methods}
    for (m, *_), r in zip(distilled, results[len(students):]):
        method_ap[m].append(r["AP"])

    s_mean, s_std = mean_std(student_ap)
    print(f"\nCOCO AP on d2kd_shapes_val, seeds {args.seeds} (one teacher, seed 0)\n")
    print("| model | AP mean ± std | per seed | gain over the student alone (mean ± std) |")
    print("|---|---|---|---|")
    print(f"| teacher | {teacher['AP']:.2f} | - | - |")
    print(f"| student alone | {s_mean:.2f} ± {s_std:.2f} | {', '.join(f'{v:.2f}' for v in student_ap)} | - |")
    for m in args.methods:
        values = method_ap[m]
        mean, std = mean_std(values)
        g, gsd = mean_std([v - b for v, b in zip(values, student_ap)])
        print(f"| {m} | {mean:.2f} ± {std:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {g:+.2f} ± {gsd:.2f} |")


if __name__ == "__main__":
    main()
