#!/usr/bin/env python
"""The main job on built-in data (``make demo``): teacher -> student alone -> distilled student.

Trains a teacher on the built-in ``d2kd_shapes`` data (once) and, side by side with it, the
student alone (one CPU thread each); then distils
the student from the teacher with GK, evaluates all three with detectron2's COCO evaluator,
and publishes each into the model zoo ``output/zoo`` (a verified release with its TorchScript
form, listed in the zoo's index.json and MODEL_ZOO.md: what ``d2kd://`` and
``d2kd.model_zoo.get`` read). It prints the payoff table -- AP against parameters, GFLOPs and
CPU latency per image (1 and 2 threads, eager and TorchScript, median and interquartile range
over 30 validation images) -- and writes a PNG of the three models' detections on the same
validation images. Finished stages are reused; an interrupted stage resumes from its last
checkpoint.

    python tools/demo.py [--output-dir output/demo] [--zoo output/zoo] [--seed 0] [--threads N]

``--pair retinanet`` (``make demo-one-stage``) runs the one-stage pair instead: a RetinaNet
teacher (2000 iterations), the RetinaNet student alone and GK, under ``output/demo_retinanet``;
``--pair gfl`` the GFL pair with LD, under ``output/demo_gfl``.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import d2kd  # noqa: E402,F401
from d2kd.config import load_config  # noqa: E402
from d2kd.data import ensure_shapes_generated  # noqa: E402
from d2kd.model_zoo.payoff import payoff_table  # noqa: E402
from d2kd.engine.experiment import SHAPES_PAIRS, comparison_table, run_comparison  # noqa: E402
from d2kd.utils.threads import add_threads_argument, set_cpu_threads  # noqa: E402
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
    parser.add_argument("--zoo", default=os.path.join(REPO, "output", "zoo"),
                        help="the zoo the three models are published into (default output/zoo, "
                             "the default base of d2kd://)")
    parser.add_argument("--latency-images", type=int, default=30, help="validation images timed per model")
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

    models, config_files = [], []
    for title, config, stage in (
        ("teacher", teacher_config, "teacher_seed0"),
        ("student alone", student_config, f"student_seed{args.seed}"),
        (distilled_title, distilled_config, f"{method}_seed{args.seed}"),
    ):
        opts = ["MODEL.WEIGHTS", os.path.join(args.output_dir, stage, "model_final.pth"),
                "DISTILL.TEACHER.WEIGHTS", teacher_weights]
        models.append((title, load_config(config, opts)))
        config_files.append(config)
    val = DatasetCatalog.get("d2kd_shapes_val")
    png = detections_side_by_side(models, [r["file_name"] for r in val[:4]], "d2kd_shapes_val",
                                  os.path.join(args.output_dir, "detections.png"))

    entries = publish_models(args, models, config_files, val, {"teacher": teacher, "student alone": student,
                                                  distilled_title: distilled})

    print("\n" + comparison_table(teacher, student, distilled, distilled_title))
    print("\nWhat the student buys (CPU, per image at the test size; latency in ms, median "
          "(interquartile range), model call only):\n")
    print(payoff_table(entries))
    (_, t), (_, d) = entries[0], entries[-1]
    print(f"\nthe distilled student against the teacher: {t['params'] / d['params']:.1f}x fewer parameters, "
          f"{t['gflops'] / d['gflops']:.1f}x fewer GFLOPs, {_speedup(t, d, 'eager')} eager and "
          f"{_speedup(t, d, 'torchscript')} TorchScript at 1 thread, "
          f"{d['metrics']['AP'] - t['metrics']['AP']:+.1f} AP")
    print(f"published into the zoo {args.zoo} (d2kd://<name>/<file>; table: "
          f"{os.path.join(args.zoo, 'MODEL_ZOO.md')}): {', '.join(e['config'][:-len('.yaml')] for _, e in entries)}")
    print(f"\ndetections of the three models on the same validation images: {png}")
    print(f"total time: {(time.time() - start) / 60:.1f} min (finished stages are reused on the next run)")


def publish_models(args, models, config_files, val, metrics):
    """Publish the teacher, the student alone and the distilled student into ``args.zoo``
    (verified, with TorchScript, timed on validation images) and return their index entries."""
    from d2kd.model_zoo.publish import publish

    images = [r["file_name"] for r in val[:8]]
    timed = [r["file_name"] for r in val[:args.latency_images]]
    entries = []
    for (title, cfg), config_file in zip(models, config_files):
        cfg = cfg.clone()
        cfg.freeze()
        name = os.path.relpath(config_file, os.path.dirname(CONFIGS))  # shapes/<config>.yaml
        entries.append((title, publish(args.zoo, name, cfg, cfg.MODEL.WEIGHTS, images=images,
                                       metrics=metrics[title], train_time_s=_train_time(cfg.MODEL.WEIGHTS),
                                       latency_images=timed)))
    return entries


def _train_time(weights):
    import json

    path = os.path.join(os.path.dirname(weights), "train_time.json")
    return json.load(open(path)).get("seconds") if os.path.isfile(path) else None


def _speedup(teacher, student, kind):
    a, b = (e["latency_ms"][kind]["1"]["median"] for e in (teacher, student))
    return f"{a / b:.1f}x faster"


if __name__ == "__main__":
    sys.exit(main())
