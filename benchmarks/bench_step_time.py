#!/usr/bin/env python
"""Training-step time of each distillation head against its floor: the student's own step
plus the part of the teacher that head needs, on the built-in shapes configs.

    python benchmarks/bench_step_time.py [--iters 40] [--device cpu] [--heads gk fitnet kd]
        [--profile 5]   # also: torch.profiler table of 5 GK steps (top ops by self CPU time)
    python benchmarks/bench_step_time.py --heads gk --two-teachers   # what a second teacher costs

``--two-teachers`` adds the configuration of
``configs/shapes/gk_faster_rcnn_R_18_half_FPN_1k_withpkdretina_shapes.yaml``: GK from the
Faster R-CNN teacher and PKD from a RetinaNet teacher (``DISTILL.TEACHERS.RETINA``), and
that PKD alone, each against its floor (every teacher's parts its heads run).

Every variant runs the same batches (forward + backward + SGD step), round-robin (batch 1
for every variant, then batch 2, ...), so a busy moment of the machine hits them all alike.
A head's floor is a plain student step plus, without gradients, the teacher parts its
declared requirements run (per teacher, ``teacher_parts`` of its slot's requirements): the backbone, and the box head on as
many RoIs as the student samples, or the dense head. The table gives the median seconds per
step with the interquartile range, the ratio to the student alone and to the floor. The
teacher has random weights: speed does not depend on them.

Peak memory of one step per variant (after the timed steps, same batch): on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the step; on CPU the
peak of the torch tensors alive during the step in ``torch.profiler``'s memory timeline
(``profile_memory``; parameters, gradients and optimizer state it sees included; allocator
slack and non-torch memory not), or "not measured" where the profiler cannot give it.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

import d2kd  # noqa: E402,F401
from d2kd.config import load_config  # noqa: E402
from d2kd.engine.prototype_refresh import collect_instance_features, rebuild_bank  # noqa: E402
from d2kd.modeling.requirements import teacher_parts  # noqa: E402
from d2kd.modeling.teachers import DEFAULT_TEACHER  # noqa: E402
from d2kd.utils.threads import add_threads_argument, set_cpu_threads  # noqa: E402
from detectron2.data import build_detection_train_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "shapes")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, batches, device, warmup=3):
    times = []
    for i, batch in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        step(batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", nargs="+", default=["gk", "fitnet", "kd"])
    parser.add_argument("--profile", type=int, default=0, help="profile this many GK steps")
    parser.add_argument("--two-teachers", action="store_true",
                        help="also PKD from a RetinaNet teacher alone, and with GK from the Faster R-CNN one")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_cpu_threads(args.threads)

    tmp = tempfile.mkdtemp()
    teacher_cfg = load_config(os.path.join(CONFIGS, "faster_rcnn_R_18_FPN_1k_shapes.yaml"), ["MODEL.DEVICE", args.device])
    torch.save({"model": build_model(teacher_cfg).state_dict()}, os.path.join(tmp, "teacher.pth"))

    def distill_cfg(heads, config="gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml", opts=()):
        return load_config(os.path.join(CONFIGS, config), [
            "MODEL.DEVICE", args.device, "DISTILL.TEACHER.WEIGHTS", os.path.join(tmp, "teacher.pth"),
            "DISTILL.HEADS", str(list(heads)), "DISTILL.SCHEDULE.START_ITER", "0", *opts])

    cfg = distill_cfg(["gk"])
    loader = iter(build_detection_train_loader(cfg))
    batches = [next(loader) for _ in range(args.iters + 3)]

    def trainer_step(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(batch):
            with EventStorage(0):
                loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    student = build_model(load_config(os.path.join(CONFIGS, "faster_rcnn_R_18_half_FPN_1k_shapes.yaml"), ["MODEL.DEVICE", args.device]))
    student.train()
    student_step = trainer_step(student)
    variants = {"student alone": student_step}
    parts_of, floor_of = {}, {}
    # (name, heads, config, extra opts)
    runs = [(head, [head], "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml", ()) for head in args.heads]
    if args.two_teachers:
        retina_cfg = load_config(os.path.join(CONFIGS, "retinanet_R_18_FPN_2k_shapes.yaml"), ["MODEL.DEVICE", args.device])
        torch.save({"model": build_model(retina_cfg).state_dict()}, os.path.join(tmp, "retina.pth"))
        two = ("gk_faster_rcnn_R_18_half_FPN_1k_withpkdretina_shapes.yaml",
               ("DISTILL.TEACHERS.RETINA.WEIGHTS", os.path.join(tmp, "retina.pth")))
        runs += [("pkd from the RetinaNet teacher", ["pkd"], *two),
                 ("gk + pkd, two teachers (Faster R-CNN, RetinaNet)", ["gk", "pkd"], *two)]
    for head, heads, config, opts in runs:
        model = build_model(distill_cfg(heads, config, opts))
        model.train()
        if model.prototype_bank is not None:
            rebuild_bank(model.prototype_bank, collect_instance_features(model, batches[:4], min_size=4), alpha=10.0)
        # what each teacher that a head reads runs per step
        parts = {name: tuple(teacher_parts(slot.requirements)) for name, slot in model.teacher_slots().items()
                 if slot.heads}
        parts_of[head] = parts
        floor = "student + " + " + ".join(
            f"{'teacher' if name == DEFAULT_TEACHER else name.lower()} {' + '.join(p) or 'nothing'}"
            for name, p in parts.items())
        floor_of[head] = floor
        if floor not in variants:
            variants[floor] = floor_step(model, student_step, parts, cfg)
        variants[f"distill: {head}"] = trainer_step(model)

    times = {name: [] for name in variants}
    for i, batch in enumerate(batches):
        for name, step in variants.items():
            sync(args.device)
            start = time.perf_counter()
            step(batch)
            sync(args.device)
            if i >= 3:
                times[name].append(time.perf_counter() - start)

    def med(name):
        return statistics.median(times[name])

    memory = {name: step_memory(step, batches[-1], args.device) for name, step in variants.items()}
    base = med("student alone")
    print(f"\nstep time on {args.device} ({torch.get_num_threads()} threads), {len(batches) - 3} timed steps "
          f"per variant, round-robin, batch {cfg.SOLVER.IMS_PER_BATCH} images of {cfg.INPUT.MIN_SIZE_TRAIN[0]} px")
    print("| variant | teacher parts run | s / step (median) | IQR | x student | x floor | peak memory / step | x student |")
    print("|---|---|---|---|---|---|---|---|")
    for name in variants:
        q = statistics.quantiles(times[name], n=4)
        head = name[len("distill: "):] if name.startswith("distill: ") else None
        parts = "; ".join(f"{n.lower()}: {' + '.join(p)}" for n, p in parts_of[head].items()) if head else "-"
        vs_floor = f"{med(name) / med(floor_of[head]):.2f}" if head else "-"
        mem = f"{memory[name] / 2 ** 20:.0f} MiB" if memory[name] is not None else "not measured"
        mem_ratio = (f"{memory[name] / memory['student alone']:.2f}"
                     if memory[name] is not None and memory["student alone"] else "-")
        print(f"| {name} | {parts} | {med(name):.3f} | {q[0]:.3f}-{q[2]:.3f} | {med(name) / base:.2f} | "
              f"{vs_floor} | {mem} | {mem_ratio} |")
    if args.profile and "distill: gk" in variants:
        profile_steps(variants["distill: gk"], batches[:args.profile])


def step_memory(step, batch, device):
    """Peak bytes one step allocates (see the module docstring); None if not measurable."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            step(batch)
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        return max(sum(s) for s in sizes) if sizes else None
    except Exception as e:  # a private profiler API: report, do not fail the benchmark
        print(f"CPU memory not measured: {type(e).__name__}: {e}")
        return None


def profile_steps(step, batches):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
    print(f"\ntorch.profiler, {len(batches)} GK steps, top ops by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def floor_step(model, student_step, parts, cfg):
    """A plain student step plus, without gradients, each teacher's ``parts[name]``."""
    rois_per_image = cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE

    @torch.no_grad()
    def run_teacher(batch, name, teacher_parts):
        if not teacher_parts:
            return
        teacher = model.teacher_slots()[name].module
        features = model.teacher_backbone(batch, name)
        if "box head" in teacher_parts:
            roi_heads = teacher.roi_heads
            boxes = []
            for x in batch:
                h, w = x["image"].shape[-2:]
                xy = torch.rand(rois_per_image, 2) * torch.tensor([w * 0.7, h * 0.7])
                boxes.append(Boxes(torch.cat([xy, xy + 8 + torch.rand(rois_per_image, 2) * 30], 1).to(model.device)))
            x = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
            roi_heads.box_predictor(roi_heads.box_head(x))
        if "dense head" in teacher_parts:
            teacher.head([features[f] for f in teacher.head_in_features])

    def step(batch):
        for name, p in parts.items():
            run_teacher(batch, name, p)
        student_step(batch)
    return step


if __name__ == "__main__":
    main()
