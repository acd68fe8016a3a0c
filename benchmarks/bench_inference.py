#!/usr/bin/env python
"""The payoff table: what a distilled student buys against its teacher and the student alone.

    python benchmarks/bench_inference.py [--zoo output/zoo] [--images 30] [--latency-threads 1 2]
    python benchmarks/bench_inference.py --coco-size [--images 3]

Default mode: the zoo's published models (``make demo`` publishes the built-in-data teacher,
student alone and GK student into ``output/zoo``), each loaded as a consumer loads it (the
release's config.yaml, strict weights, its TorchScript file), timed again on the first
``--images`` validation images: AP (as published), parameters, GFLOPs per image at the test
size (detectron2's FlopCountAnalysis) and CPU latency per image at each thread count, eager
and TorchScript, median and interquartile range (model call on the resized input; image
decoding and resizing not timed; 3 untimed warm-up calls each). ``--update-index`` writes the
new latency into the zoo's index and MODEL_ZOO.md.

``--coco-size``: the shipped COCO pair (Faster R-CNN R-101 teacher, R-50 student; random
weights, since speed does not depend on them) on random 800 x 1333 images: parameters,
GFLOPs and eager latency, what the student buys at the size the papers report.

Time it on a quiet machine: with another process on the cores, 2-thread numbers slow 5-6x.
"""
import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

import d2kd  # noqa: E402,F401
from d2kd.model_zoo.payoff import format_latency, payoff_table, release_latency  # noqa: E402
from d2kd.model_zoo.publish import load_index, update_index  # noqa: E402

DEMO_MODELS = [
    ("teacher (Faster R-CNN R-18, FPN 64)", "shapes/faster_rcnn_R_18_FPN_1k_shapes"),
    ("student alone (R-18 half, FPN 32)", "shapes/faster_rcnn_R_18_half_FPN_1k_shapes"),
    ("distilled student (GK)", "shapes/gk_faster_rcnn_R_18_half_FPN_1k_shapes"),
]


def zoo_payoff(args):
    from detectron2.data import DatasetCatalog

    index = load_index(args.zoo)["models"]
    missing = [name for _, name in DEMO_MODELS if name not in index]
    if missing:
        sys.exit(f"bench_inference: {args.zoo} lacks {', '.join(missing)}: run `make demo` first "
                 "(it publishes them there), or pass --zoo")
    images = [r["file_name"] for r in DatasetCatalog.get("d2kd_shapes_val")[:args.images]]
    rows = []
    for title, name in DEMO_MODELS:
        entry = dict(index[name])
        entry["latency_ms"] = release_latency(os.path.join(args.zoo, name), images, args.latency_threads)
        if args.update_index:
            update_index(args.zoo, name, entry)
        rows.append((title, entry))
        print(f"timed {name} on {len(images)} images", flush=True)
    print(f"\n{len(images)} validation images, threads {args.latency_threads}, latency in ms, median "
          "(interquartile range):\n")
    print(payoff_table(rows, args.latency_threads))


def coco_payoff(args):
    import torch
    from detectron2.modeling import build_model

    from d2kd.config import load_config
    from d2kd.export import student_config
    from d2kd.modeling.teacher import build_teacher_cfg
    from d2kd.utils.inference_cost import gflops_per_image, latency_ms, parameter_count

    cfg = load_config(os.path.join(REPO, "configs", "gk_faster_r50.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    models = [("teacher: Faster R-CNN R-101 FPN", build_teacher_cfg(cfg)),
              ("student: Faster R-CNN R-50 FPN", student_config(cfg))]
    rng = np.random.default_rng(0)
    images = [torch.as_tensor(rng.random((3, 800, 1333), dtype=np.float32) * 255) for _ in range(args.images)]
    print("| model | params | GFLOPs (800 x 1333) | " + " | ".join(
        f"{t} thread{'s' if t > 1 else ''}: eager ms" for t in args.latency_threads) + " |")
    print("|" + "---|" * (3 + len(args.latency_threads)))
    for title, mcfg in models:
        mcfg = mcfg.clone()
        mcfg.defrost()
        mcfg.MODEL.WEIGHTS = ""
        torch.manual_seed(0)
        model = build_model(mcfg).eval()
        gflops = gflops_per_image(model, images[:1])
        lat = [latency_ms(lambda x: model([{"image": x}]), images, t, warmup=1) for t in args.latency_threads]
        print(f"| {title} | {parameter_count(model) / 1e6:.1f} M | {gflops:.0f} | "
              + " | ".join(format_latency(x) for x in lat) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=os.path.join(REPO, "output", "zoo"))
    parser.add_argument("--images", type=int, default=30, help="images timed per model (>= 30 for the table)")
    parser.add_argument("--latency-threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts to time at")
    parser.add_argument("--update-index", action="store_true", help="record the new latency in the zoo")
    parser.add_argument("--coco-size", action="store_true", help="the COCO R-101 -> R-50 pair at 800 x 1333")
    args = parser.parse_args()
    coco_payoff(args) if args.coco_size else zoo_payoff(args)


if __name__ == "__main__":
    main()
