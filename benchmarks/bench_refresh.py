#!/usr/bin/env python
"""Prototype refresh time against training time: the shapes GK run, and a COCO-scale model.

    python benchmarks/bench_refresh.py [--refreshes 3] [--steps 20] [--threads N]
    python benchmarks/bench_refresh.py --coco [--coco-images 2] [--threads N]

Shapes (default): the trainer of ``configs/shapes/gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml``
(random teacher weights: speed does not depend on them) with ``DISTILL.PROTOTYPES.SOURCE
online``. It times ``--steps`` training steps, the part of each that fills the online store,
and ``--refreshes`` builds of the bank both ways, each build's phases as the refresh hook
logs them:

- images (the paper's refresh, the default): the student's features of the fixed per-class
  image subset re-extracted at every build; the teacher's kept from the first build, and the
  read and resized images kept (``IMAGE_CACHE_BYTES``), so a later build is the student's
  forward, the pooling and the selection;
- online: the build selects from the store the training steps filled; nothing is extracted.

The share is a later build's time, plus for the online mode the store's cost in the steps
of one refresh period, against one refresh period of training (PERIOD iterations at the
measured step time) plus the build: the figure `distill/prototype_refresh_time` gives.

``--coco``: a cost model at COCO scale (train2017: 117266 images with boxes, 80 classes, up
to 800 images per class, i.e. the distinct images ``bench_prototype_sampling``'s COCO-like set
draws, about 35k). It times, on this machine, the real-size models with random weights
(Faster R-CNN R-101 FPN teacher, R-50 FPN student of ``configs/gk_faster_r50.yaml``) on
``--coco-images`` random images: the student's training step (forward and backward at
800 x 1333 with 7 GT boxes), the teacher's backbone forward, the student's backbone forward
at the test size (what the images refresh runs per image), the online store's pooling of a
step and one PGM selection per stored (class, level). It prints the refresh share of an
epoch per mode at 1 and 8 GPUs, each rank extracting its shard (1/8 of the images and of
the training) and selecting its share of the (class, level) pairs. Reading and resizing the
images are left out of both sides (data-loader workers do them in training; the refresh
reads in the training process). The ratios on a GPU differ from a CPU's; the model says
which costs scale with what.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import d2kd  # noqa: E402,F401
import d2kd.modeling.distill_mixin as mixin_module  # noqa: E402
from d2kd.config import load_config  # noqa: E402
from d2kd.utils.threads import add_threads_argument, set_cpu_threads  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "shapes")


def _timed_store(timings):
    """record_step_instances, timing each call into ``timings``."""
    original = mixin_module.record_step_instances

    def timed(*args, **kwargs):
        start = time.perf_counter()
        original(*args, **kwargs)
        timings.append(time.perf_counter() - start)
    return original, timed


def shapes(args):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from d2kd.engine import DistillTrainer
    from d2kd.engine.prototype_refresh import PrototypeRefreshHook

    tmp = tempfile.mkdtemp()
    teacher_cfg = load_config(os.path.join(CONFIGS, "faster_rcnn_R_18_FPN_1k_shapes.yaml"), ["MODEL.DEVICE", "cpu"])
    torch.save({"model": build_model(teacher_cfg).state_dict()}, os.path.join(tmp, "teacher.pth"))
    cfg = load_config(os.path.join(CONFIGS, "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml"), [
        "MODEL.DEVICE", "cpu", "DISTILL.TEACHER.WEIGHTS", os.path.join(tmp, "teacher.pth"),
        "OUTPUT_DIR", os.path.join(tmp, "out"), "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
        "DISTILL.PROTOTYPES.SOURCE", "online"])
    trainer = DistillTrainer(cfg)
    hook = next(h for h in trainer._hooks if isinstance(h, PrototypeRefreshHook))
    model = hook._model()
    period = hook.period
    store = model.prototype_bank.store

    store_times = []
    original, timed = _timed_store(store_times)
    mixin_module.record_step_instances = timed
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer._trainer.storage = storage
        hook.refresh(0)  # the bank GK needs (the store is empty: from the images), untimed
        steps = []
        for i in range(args.steps + 2):
            storage.iter = trainer._trainer.iter = i
            start = time.perf_counter()
            trainer._trainer.run_step()
            if i >= 2:
                steps.append(time.perf_counter() - start)
        mixin_module.record_step_instances = original
        step = statistics.median(steps)
        store_step = statistics.median(store_times[2:])
        seen = len(store)
        fill_store(store, period / len(store_times))

        results = {}
        # images: the hook's own path with the store set aside
        model.prototype_bank.store = None
        hook._teacher_cache, hook._teacher_cache_key, hook._mapped, hook._mapped_bytes = {}, None, {}, 0
        results["images"] = []
        for r in range(args.refreshes):
            start = time.perf_counter()
            hook.refresh(period * (r + 1))
            results["images"].append((time.perf_counter() - start, dict(hook.timings)))
        model.prototype_bank.store = store
        results["online"] = []
        for r in range(args.refreshes):
            start = time.perf_counter()
            hook.refresh(period * (r + 1))
            results["online"].append((time.perf_counter() - start, dict(hook.timings)))

    images = len(hook.images())
    print(f"\nshapes GK config, CPU, {torch.get_num_threads()} threads: {images} prototype images; online store "
          f"{seen} instances after {len(store_times)} steps, filled to {len(store)} as after {period} "
          f"(capacity {store.capacity} per class); "
          f"training step {step:.3f} s (median of {args.steps}, the store's part {1000 * store_step:.1f} ms), "
          f"PERIOD {period} iterations = {period * step:.1f} s of training per build")
    print("| refresh | build times (s) | a later build's phases (s) | later builds, median (s) | "
          "store per period (s) | share of training |")
    print("|---|---|---|---|---|---|")
    for mode, runs in results.items():
        times = [t for t, _ in runs]
        later = statistics.median(times[1:]) if len(times) > 1 else times[0]
        phases = ", ".join(f"{k} {v:.2f}" for k, v in runs[-1][1].items())
        per_period = period * store_step if mode == "online" else 0.0
        train = period * (step - store_step)  # the training step itself, the store's part taken out
        share = (later + per_period) / (train + later + per_period)
        print(f"| {mode} | {', '.join(f'{t:.2f}' for t in times)} | {phases} | {later:.2f} | "
              f"{per_period:.2f} | {100 * share:.1f}% |")


def fill_store(store, factor: float) -> None:
    """Fill ``store`` to what ``factor`` times the steps that filled it would have left (a
    class's count times factor, at most the capacity), re-adding its rows with a 1% jitter,
    so the online build selects from as many instances as after one refresh period."""
    sets = store.feature_sets()
    g = torch.Generator().manual_seed(0)
    for c in range(store.num_classes):
        n = int(store.count[c])
        want = min(store.capacity, int(round(n * factor)))
        if n == 0 or want <= n:
            continue
        idx = torch.arange(want - n) % n
        jitter = {}
        for side, k in (("s", 0), ("t", 1)):
            jitter[side] = {s: per[c][k][idx] * (1 + 0.01 * torch.randn(len(idx), per[c][k].shape[1], generator=g))
                            for s, per in sets.items()}
        source = sets[store.strides[0]][c][2][idx]
        store.add(torch.full((len(idx),), c, dtype=torch.long), jitter["s"], jitter["t"], source, -1, gather=False)


# ---------------------------------------------------------------------------- COCO cost model
COCO_TRAIN_IMAGES = 117266  # train2017 images with boxes (detectron2's filter_empty)
COCO_BOXES_PER_IMAGE = 7.3


def _median_time(fn, repeats):
    def timed():
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()  # warm-up
    return statistics.median(timed() for _ in range(repeats))


def _coco_batch(rng, h=800, w=1216, boxes=7, classes=80):
    from detectron2.structures import Boxes, Instances

    image = torch.as_tensor(rng.random((3, h, w), dtype=np.float32) * 255)  # moved by the model
    xy = rng.random((boxes, 2)) * [w * 0.7, h * 0.7]
    wh = 32 + rng.random((boxes, 2)) * [w * 0.25, h * 0.25]
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.as_tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32))
    inst.gt_classes = torch.as_tensor(rng.integers(0, classes, boxes))
    return [{"image": image, "instances": inst, "height": h, "width": w, "image_id": 1}]


def coco_like_instances(images: int, budget: int, min_size: float = 30):
    """On ``bench_prototype_sampling``'s COCO-like long-tail set: the distinct images of the
    per-class subsets (up to ``budget`` per class), the usable instances per class in them,
    and the usable instances per class in the whole set (what an epoch offers the store)."""
    from collections import Counter

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_prototype_sampling import coco_like, usable

    from d2kd.engine.prototype_refresh import images_and_classes, per_class_image_subsets

    records, _ = coco_like(images)
    drawn = images_and_classes(per_class_image_subsets(records, budget, min_size, seed=0))
    subset, epoch = Counter(), Counter()
    for i, classes in drawn:
        subset.update(usable(records[i], set(classes), min_size))
    for r in records:
        epoch.update(usable(r, None, min_size))
    return len(drawn), [subset.get(c, 0) for c in range(80)], [epoch.get(c, 0) for c in range(80)]


def coco(args):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from d2kd.engine.prototype_refresh import assign_selections
    from d2kd.export import student_config
    from d2kd.modeling.teacher import build_teacher_cfg
    from d2kd.prototypes.online_store import step_instances
    from d2kd.prototypes.selection import select_prototypes
    from d2kd.structures import by_stride

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_prototype_selection import make_problem

    cfg = load_config(os.path.join(REPO, "configs", "gk_faster_r50.yaml"))
    cfg.MODEL.DEVICE = args.device
    rng = np.random.default_rng(0)
    batch = _coco_batch(rng)
    test = _coco_batch(rng, 800, 1216)
    reps = args.coco_images

    tcfg, scfg = build_teacher_cfg(cfg).clone(), student_config(cfg).clone()
    for c in (tcfg, scfg):
        c.defrost()
        c.MODEL.WEIGHTS = ""
        c.MODEL.DEVICE = args.device
    torch.manual_seed(0)
    teacher = build_model(tcfg).eval()
    student = build_model(scfg)

    def train_step():
        student.train()
        with EventStorage(0):
            loss = sum(student(batch).values())
        loss.backward()
        student.zero_grad(set_to_none=True)

    t_train = _median_time(train_step, reps)
    with torch.no_grad():
        t_teacher = _median_time(lambda: teacher.backbone(teacher.preprocess_image(batch).tensor), reps)
        student.eval()
        t_student = _median_time(lambda: student.backbone(student.preprocess_image(test).tensor), reps)
        s_maps = by_stride(student.backbone, student.backbone(student.preprocess_image(batch).tensor))
        t_maps = by_stride(teacher.backbone, teacher.backbone(teacher.preprocess_image(batch).tensor))
    strides = sorted(set(s_maps) & set(t_maps))
    gt = [batch[0]["instances"].to(args.device)]
    t_pool = _median_time(lambda: step_instances(batch, gt, s_maps, t_maps, strides, 30.0), reps)

    # PGM: time a few sizes, fit a N^2 + b N, apply to every (class, level) of each mode
    dim = s_maps[strides[0]].shape[1]
    fit_n = [500, 1000, 2000]
    fit_t = []
    for n in fit_n:
        fs, ft = make_problem(n, dim, n, args.device)
        fit_t.append(_median_time(lambda: select_prototypes(fs, ft, 10), 1))
    a, b = np.linalg.lstsq(np.array([[n * n, n] for n in fit_n], float), np.array(fit_t), rcond=None)[0]

    def pgm(n):
        return max(0.0, a * n * n + b * n)

    distinct, images_sizes, epoch_sizes = coco_like_instances(COCO_TRAIN_IMAGES, 800)
    capacity = int(cfg.DISTILL.PROTOTYPES.ONLINE_CAPACITY)
    online_sizes = [min(capacity, n) for n in epoch_sizes]  # the store: a class's latest instances
    per_image = t_train + t_teacher  # a GK step's models per image (the heads' own cost left out)

    where = args.device if args.device != "cpu" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nCOCO-scale cost model, {where}, random weights, "
          f"median of {reps} after a warm-up:")
    print(f"  student R-50 FPN training step (forward + backward, 800 x 1216, 7 boxes): {t_train:.2f} s / image")
    print(f"  teacher R-101 FPN backbone forward: {t_teacher:.2f} s / image")
    print(f"  student backbone forward at the test size (the images refresh, per image): {t_student:.2f} s")
    print(f"  online store, one step's pooling at {len(strides)} levels, both models: {1000 * t_pool:.1f} ms / image")
    print(f"  PGM selection fit: {a:.3g} N^2 + {b:.3g} N s (N = {fit_n}: {', '.join(f'{t:.2f}' for t in fit_t)} s)")
    print(f"  COCO-like set: {distinct} distinct images in the per-class subsets; instances per class, "
          f"images mode: median {sorted(images_sizes)[40]}, max {max(images_sizes)}; online mode: "
          f"min(ONLINE_CAPACITY {capacity}, the epoch's), median {sorted(online_sizes)[40]}")
    print("\n| GPUs | mode | training per epoch per rank | refresh per epoch per rank "
          "(extraction + store + selection) | share |")
    print("|---|---|---|---|---|")
    for world in (1, 8):
        train = COCO_TRAIN_IMAGES * per_image / world
        for mode, sizes in (("images", images_sizes), ("online", online_sizes)):
            features = {s: {c: (torch.empty(n, dim), torch.empty(n, dim), None) for c, n in enumerate(sizes) if n}
                        for s in strides}
            shares = assign_selections(features, world)
            select = max(sum(pgm(len(features[s][c][0])) for s, c in share) for share in shares)
            if mode == "images":
                extract, store = distinct * t_student / world, 0.0
            else:
                extract, store = 0.0, COCO_TRAIN_IMAGES * t_pool / world
            refresh = extract + store + select
            print(f"| {world} | {mode} | {train / 3600:.1f} h | {refresh / 60:.1f} min ({extract / 60:.1f} + "
                  f"{store / 60:.1f} + {select / 60:.1f}) | {100 * refresh / (train + refresh):.1f}% |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refreshes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--coco", action="store_true", help="the COCO-scale cost model")
    parser.add_argument("--coco-images", type=int, default=2, help="timed repeats per COCO-size model pass")
    parser.add_argument("--device", default="cpu", help="--coco: where the models and PGM are timed")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_cpu_threads(args.threads)
    coco(args) if args.coco else shapes(args)


if __name__ == "__main__":
    main()
