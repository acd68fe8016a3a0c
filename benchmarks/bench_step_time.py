#!/usr/bin/env python
"""Training-step time of each distillation head against the student alone and against the
student plus the teacher's forward pass, on the built-in shapes configs.

    python benchmarks/bench_step_time.py [--iters 20] [--device cpu] [--heads gk fitnet kd]

Every variant runs the same batches (forward + backward + SGD step); the table gives the
median seconds per step and the ratio to the student alone. The teacher has random weights:
speed does not depend on them.
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
from detectron2.data import build_detection_train_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
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
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", nargs="+", default=["gk", "fitnet", "kd"])
    args = parser.parse_args()

    tmp = tempfile.mkdtemp()
    teacher_cfg = load_config(os.path.join(CONFIGS, "faster_rcnn_R_18_FPN_1k_shapes.yaml"), ["MODEL.DEVICE", args.device])
    torch.save({"model": build_model(teacher_cfg).state_dict()}, os.path.join(tmp, "teacher.pth"))

    def distill_cfg(heads):
        return load_config(os.path.join(CONFIGS, "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml"), [
            "MODEL.DEVICE", args.device, "DISTILL.TEACHER.WEIGHTS", os.path.join(tmp, "teacher.pth"),
            "DISTILL.HEADS", str(list(heads)), "DISTILL.SCHEDULE.START_ITER", "0"])

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

    rows = []
    student = build_model(load_config(os.path.join(CONFIGS, "faster_rcnn_R_18_half_FPN_1k_shapes.yaml"), ["MODEL.DEVICE", args.device]))
    student.train()
    base = time_steps(trainer_step(student), batches, args.device)
    rows.append(("student alone", base))

    # What a feature-only head adds at the least: the teacher's backbone, without gradients.
    holder = build_model(distill_cfg(["fitnet"]))
    holder.train()
    student_step = trainer_step(student)

    def student_and_teacher(batch):
        holder.teacher_backbone(batch)
        student_step(batch)

    rows.append(("student + teacher backbone forward", time_steps(student_and_teacher, batches, args.device)))

    for head in args.heads:
        model = build_model(distill_cfg([head]))
        model.train()
        if model.prototype_bank is not None:
            rebuild_bank(model.prototype_bank, collect_instance_features(model, batches[:4], min_size=4), alpha=10.0)
        rows.append((f"distill: {head}", time_steps(trainer_step(model), batches, args.device)))

    print(f"\nstep time on {args.device} ({torch.get_num_threads()} threads), {len(batches) - 3} timed steps, "
          f"batch {cfg.SOLVER.IMS_PER_BATCH} images of {cfg.INPUT.MIN_SIZE_TRAIN[0]} px")
    print("| variant | s / step | x student |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
