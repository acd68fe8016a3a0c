#!/usr/bin/env python
"""Prototype refresh time against training time, on the shapes GK config.

    python benchmarks/bench_refresh.py [--refreshes 3] [--steps 20] [--threads N]

Builds the trainer of ``configs/shapes/gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml`` (random
teacher weights: speed does not depend on them), times ``--steps`` training steps and
``--refreshes`` builds of the prototype bank by its refresh hook, two ways:

- before: as before issue 12: the teacher's instance features extracted at every build and
  PGM in float64 throughout (``select_prototypes(gram_dtype=None, method="cached")``);
- now: the teacher's features kept from the first build (later builds extract only the
  student's), PGM as the hook now runs it.

The share is a build's time against one refresh period of training at the measured step
time (PERIOD iterations) plus the build, the figure `distill/prototype_refresh_time` gives
in a real run's metrics.
"""
import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import d2kd  # noqa: E402,F401
import d2kd.engine.prototype_refresh as refresh_module  # noqa: E402
from d2kd.config import load_config  # noqa: E402
from d2kd.engine import DistillTrainer  # noqa: E402
from d2kd.engine.prototype_refresh import PrototypeRefreshHook  # noqa: E402
from d2kd.utils.experiment import add_threads_argument, set_cpu_threads  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "shapes")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--refreshes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_cpu_threads(args.threads)

    tmp = tempfile.mkdtemp()
    teacher_cfg = load_config(os.path.join(CONFIGS, "faster_rcnn_R_18_FPN_1k_shapes.yaml"), ["MODEL.DEVICE", "cpu"])
    torch.save({"model": build_model(teacher_cfg).state_dict()}, os.path.join(tmp, "teacher.pth"))
    cfg = load_config(os.path.join(CONFIGS, "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml"), [
        "MODEL.DEVICE", "cpu", "DISTILL.TEACHER.WEIGHTS", os.path.join(tmp, "teacher.pth"),
        "OUTPUT_DIR", os.path.join(tmp, "out"), "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()"])
    trainer = DistillTrainer(cfg)
    hook = next(h for h in trainer._hooks if isinstance(h, PrototypeRefreshHook))
    period = hook.period  # in iterations, whichever DISTILL.PROTOTYPES keys gave it

    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer._trainer.storage = storage
        hook.refresh(0)  # the bank GK needs (and the images' first read), untimed
        steps = []
        for i in range(args.steps + 2):
            storage.iter = trainer._trainer.iter = i
            start = time.perf_counter()
            trainer._trainer.run_step()
            if i >= 2:
                steps.append(time.perf_counter() - start)
        step = statistics.median(steps)

        original = refresh_module.select_prototypes
        results = {}
        for mode in ("before", "now"):
            if mode == "before":
                refresh_module.select_prototypes = functools.partial(original, gram_dtype=None, method="cached",
                                                                     cache_bytes=1 << 30)
            else:
                refresh_module.select_prototypes = original
            hook._teacher_cache, hook._teacher_cache_key = {}, None
            times = []
            for r in range(args.refreshes):
                if mode == "before":
                    hook._teacher_cache, hook._teacher_cache_key = {}, None
                start = time.perf_counter()
                hook.refresh(period * (r + 1))
                times.append(time.perf_counter() - start)
            results[mode] = times
        refresh_module.select_prototypes = original

    images = len(hook.images())
    print(f"\nshapes GK config, CPU, {torch.get_num_threads()} threads: {images} prototype images, "
          f"training step {step:.3f} s (median of {args.steps}), PERIOD {period} iterations "
          f"= {period * step:.1f} s of training per build")
    print("| refresh | build times (s) | later builds, median (s) | share of training (later builds) |")
    print("|---|---|---|---|")
    for mode, times in results.items():
        later = statistics.median(times[1:]) if len(times) > 1 else times[0]
        share = later / (period * step + later)
        print(f"| {mode} | {', '.join(f'{t:.2f}' for t in times)} | {later:.2f} | {100 * share:.1f}% |")


if __name__ == "__main__":
    main()
