#!/usr/bin/env python
"""The GPU check: everything d2kd can only verify on a CUDA device, in one run, one summary.

    benchmarks/device_check.sh [--dry-run] [--budget-s 590] [--only NAME ...] [--out DIR]

Steps, in order, each under its own time limit and all within ``--budget-s`` (a step left with
under 30 s of it is reported as not run, which fails the check):

1. ``cuda-tests``: the tests that skip without CUDA (fp16 + GradScaler AMP training,
   PGM on CUDA against the CPU); a skip counts as a failure here.
2. ``amp-gk``, ``amp-kd``, ``amp-ld``, ``amp-crosskd``, ``amp-gk-online``: 100 iterations of GK and
   KD (Faster R-CNN), LD and CrossKD (GFL: the cross head runs the teacher's layers with
   gradients) and GK with ``DISTILL.PROTOTYPES.SOURCE online`` on the built-in data with
   ``SOLVER.AMP.ENABLED True`` (float16, GradScaler) on the GPU;
   every logged loss must be finite. Teachers: ``make demo``'s trained ones when
   ``output/demo`` holds them, else random weights (said in the summary) with GK's feature
   weight lowered as the tests do (a random teacher's features are large).
3. ``step-time``: ``bench_step_time.py --device cuda`` (each head against its floor).
4. ``pgm``: ``bench_prototype_selection.py --device cuda --sizes 2000 20000`` (same picks).
5. ``refresh-coco``: ``bench_refresh.py --coco --device cuda`` (the COCO-scale refresh share
   from the real-size models timed on the GPU).
6. ``inference``: ``bench_inference.py --coco-size --images 3`` (it has no device option: the
   CPU latency of the COCO pair, next to the GPU numbers).

Without CUDA it stops at once with exit status 2 and says so (``--dry-run`` prints the plan
and runs nothing, anywhere). Exit status 0 when every step ran and passed, 1 otherwise.
Logs go to ``--out`` (default ``output/device_check``), one file per step.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, List, NamedTuple, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "configs", "shapes")
BENCH = os.path.join(REPO, "benchmarks")


class Step(NamedTuple):
    name: str
    command: List[str]
    timeout_s: int
    check: Optional[Callable[[str, str], Optional[str]]] = None  # (log text, out dir) -> problem or None
    note: str = ""


def _no_skips(text: str, _out: str) -> Optional[str]:
    if " skipped" in text or " SKIPPED" in text:
        return "a CUDA test was skipped (CUDA not visible to the tests?)"
    return None


def _finite_losses(text: str, out: str) -> Optional[str]:
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        return f"no {path}: the run logged no metrics"
    losses = 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            for key, value in row.items():
                if "loss" in key and isinstance(value, (int, float)):
                    losses += 1
                    if not math.isfinite(value):
                        return f"{key} = {value} at iteration {row.get('iteration')}"
    return None if losses else "metrics.json holds no loss"


def _trained_teacher(name: str) -> Optional[str]:
    path = os.path.join(REPO, "output", "demo", name, "model_final.pth")
    return path if os.path.exists(path) else None


def _random_teacher(config: str, path: str) -> str:
    """Save a random-weight teacher for ``config`` (only when a step needs it)."""
    if not os.path.exists(path):
        code = ("import sys, torch, d2kd; from d2kd.config import load_config; "
                "from detectron2.modeling import build_model; "
                "cfg = load_config(sys.argv[1], ['MODEL.DEVICE', 'cpu']); torch.manual_seed(0); "
                "torch.save({'model': build_model(cfg).state_dict()}, sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, config, path], check=True, cwd=REPO)
    return path


def plan(out: str, python: str, dry_run: bool) -> List[Step]:
    train = [python, os.path.join(REPO, "train_net.py")]
    steps = [Step("cuda-tests", [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                 "tests/test_amp.py::test_cuda_float16_training_runs_the_teacher_in_float16_and_losses_in_float32",
                                 "tests/test_prototype_selection.py::test_cuda_matches_cpu"], 120, _no_skips)]
    runs = [("gk", "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml", "faster_rcnn_R_18_FPN_1k_shapes.yaml", "teacher_seed0"),
            ("kd", "kd_faster_rcnn_R_18_half_FPN_1k_shapes.yaml", "faster_rcnn_R_18_FPN_1k_shapes.yaml", "teacher_seed0"),
            ("ld", "ld_gfl_R_18_half_FPN_1k_shapes.yaml", "gfl_R_18_FPN_2k_shapes.yaml", "gfl_teacher_seed0"),
            # the cross head runs the teacher's layers with gradients, in the student's precision
            ("crosskd", "crosskd_gfl_R_18_half_FPN_1k_shapes.yaml", "gfl_R_18_FPN_2k_shapes.yaml", "gfl_teacher_seed0")]
    runs.append(("gk-online", "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml", "faster_rcnn_R_18_FPN_1k_shapes.yaml",
                 "teacher_seed0"))
    for head, config, teacher_config, teacher_dir in runs:
        weights = _trained_teacher(teacher_dir)
        note = "trained teacher" if weights else "random teacher"
        extra = []
        if weights is None:
            path = os.path.join(out, f"random_{os.path.splitext(teacher_config)[0]}.pth")
            weights = path if dry_run else _random_teacher(os.path.join(SHAPES, teacher_config), path)
            if head.startswith("gk"):
                extra = ["DISTILL.GK.FEATURE_WEIGHT", "1e-6"]
        if head == "gk-online":
            extra += ["DISTILL.PROTOTYPES.SOURCE", "online"]
        run_dir = os.path.join(out, f"amp_{head}")
        steps.append(Step(f"amp-{head}", train + [
            "--config-file", os.path.join(SHAPES, config), "MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True",
            "SOLVER.MAX_ITER", "100", "SOLVER.CHECKPOINT_PERIOD", "100000", "DATASETS.TEST", "()",
            "DISTILL.TEACHER.WEIGHTS", weights, "DISTILL.PROTOTYPES.START_ITER", "20", "DISTILL.PROTOTYPES.PERIOD", "40",
            "OUTPUT_DIR", run_dir] + extra, 90,
            lambda text, _out, run_dir=run_dir: _finite_losses(text, run_dir), note))
    steps += [
        Step("step-time", [python, os.path.join(BENCH, "bench_step_time.py"), "--device", "cuda", "--iters", "30"], 120),
        Step("pgm", [python, os.path.join(BENCH, "bench_prototype_selection.py"), "--device", "cuda",
                     "--sizes", "2000", "20000", "--repeats", "2"], 90,
             lambda text, _out: "picks differ from the float64 reference" if " NO" in text else None),
        Step("refresh-coco", [python, os.path.join(BENCH, "bench_refresh.py"), "--coco", "--device", "cuda"], 120),
        Step("inference", [python, os.path.join(BENCH, "bench_inference.py"), "--coco-size", "--images", "3"], 120,
             note="CPU latency: bench_inference.py has no device option"),
    ]
    return steps


def cuda_available(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True)
    return probe.returncode == 0


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join("      " + line for line in kept[-lines:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--budget-s", type=int, default=590, help="wall-clock budget of the whole check")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these steps")
    parser.add_argument("--out", default=os.path.join(REPO, "output", "device_check"))
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)

    steps = plan(args.out, args.python, dry_run=True)
    names = [s.name for s in steps]
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            parser.error(f"unknown step(s) {unknown}; the steps are {names}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.dry_run:
        print(f"device_check plan (budget {args.budget_s} s, logs in {args.out}):")
        for s in steps:
            if not args.only or s.name in args.only:
                print(f"  {s.name} (limit {s.timeout_s} s{', ' + s.note if s.note else ''}): {' '.join(s.command)}")
        return 0
    if not cuda_available(args.python):
        print("device_check: no CUDA device (torch.cuda.is_available() is False for "
              f"{args.python}): nothing was checked. Run it on a machine with an NVIDIA GPU and a "
              "CUDA build of torch; --dry-run shows the plan.", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    steps = plan(args.out, args.python, dry_run=False)
    start, results = time.monotonic(), []
    for s in steps:
        if args.only and s.name not in args.only:
            continue
        left = args.budget_s - (time.monotonic() - start)
        if left < min(s.timeout_s, 30):
            results.append((s, "NOT RUN", 0.0, f"{left:.0f} s of the budget left"))
            continue
        log = os.path.join(args.out, f"{s.name}.log")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(s.command, cwd=REPO, capture_output=True, text=True, timeout=min(s.timeout_s, left))
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            text = ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")) + "\nTIMED OUT"
            rc = 124
        took = time.monotonic() - t0
        with open(log, "w") as f:
            f.write(text)
        problem = f"exit status {rc}" if rc else (s.check(text, args.out) if s.check else None)
        results.append((s, "FAIL" if problem else "PASS", took, problem or _tail(text)))
        print(f"[{s.name}] {'FAIL: ' + problem if problem else 'pass'} ({took:.0f} s, log {log})", flush=True)

    print(f"\n==== device_check summary ({time.monotonic() - start:.0f} s of {args.budget_s} s) ====")
    for s, status, took, detail in results:
        print(f"{status:7} {s.name:13} {took:5.0f} s{'  (' + s.note + ')' if s.note else ''}")
        if detail:
            print(detail if status == "PASS" else "      " + detail)
    return 0 if all(status == "PASS" for _, status, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
