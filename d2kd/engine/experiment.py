"""Train-and-evaluate stages that are skipped when done and resumed when interrupted.

Used by ``tools/demo.py`` and the multi-seed benchmark; each stage is an ordinary detectron2
training run in its own OUTPUT_DIR, so this lives with the trainer it drives (the engine floor).
"""
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Dict, List, Sequence, Tuple

from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..config import load_config
from ..utils.atomic import atomic_write
from ..utils.threads import cpu_threads
from .trainer import DistillTrainer

logger = logging.getLogger("d2kd")

RESULTS_FILE = "final_results.json"
TRAIN_TIME_FILE = "train_time.json"

# The built-in data's teacher/student pairs (file names under configs/shapes/), shared by
# tools/demo.py and benchmarks/bench_shapes_seeds.py. One-stage teachers train 2000
# iterations (they converge more slowly from scratch); every student trains 1000.
SHAPES_PAIRS: Dict[str, Tuple[str, str]] = {
    "faster_rcnn": ("faster_rcnn_R_18_FPN_1k_shapes.yaml", "faster_rcnn_R_18_half_FPN_1k_shapes.yaml"),
    "retinanet": ("retinanet_R_18_FPN_2k_shapes.yaml", "retinanet_R_18_half_FPN_1k_shapes.yaml"),
    "gfl": ("gfl_R_18_FPN_2k_shapes.yaml", "gfl_R_18_half_FPN_1k_shapes.yaml"),
}


def stage_results(output_dir: str):
    """The saved results of a finished stage, or None."""
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_train_time(output_dir: str, seconds: float, iterations: int) -> None:
    """A finished stage's ``train_time.json`` (the zoo's table reads it), on the main process."""
    if comm.is_main_process():
        atomic_write(os.path.join(output_dir, TRAIN_TIME_FILE), json.dumps({
            "seconds": round(seconds, 1), "iterations": iterations,
            "note": "wall time of the run that finished the stage (a resumed stage: its last run only)"}))


def save_stage_results(output_dir: str, bbox: Dict) -> None:
    """A finished stage's ``final_results.json`` (what :func:`stage_results` reads back)."""
    if comm.is_main_process():
        atomic_write(os.path.join(output_dir, RESULTS_FILE), json.dumps(bbox, indent=1))


def train_and_evaluate(config_file: str, output_dir: str, opts: Sequence[str] = ()) -> Dict:
    """Train ``config_file`` into ``output_dir`` and evaluate it; return the bbox metrics.

    Finished stages (``final_results.json`` present) are returned without work; an
    interrupted one resumes from its last checkpoint (training) or re-runs evaluation. A
    ``.py`` LazyConfig is trained by ``d2kd.lazy_train_net.train_and_evaluate_lazy`` (the same
    contract; ``opts`` are then "key=value" overrides).
    """
    if config_file.endswith(".py"):  # a LazyConfig (e.g. a ViTDet teacher): detectron2's LazyConfig loop
        from ..lazy_train_net import train_and_evaluate_lazy  # here: that module imports this one

        return train_and_evaluate_lazy(config_file, output_dir, opts)
    done = stage_results(output_dir)
    if done is not None:
        logger.info(f"Reusing finished stage {output_dir}")
        return done
    os.makedirs(output_dir, exist_ok=True)
    cfg = load_config(config_file, list(opts) + ["OUTPUT_DIR", output_dir])
    cfg.freeze()
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    # SEED as detectron2's default_setup reads it (train_net.py's path): every RNG, per rank, so a
    # stage's "seed" is a reproducible run and not only a label (-1: a random seed)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=True)
    start, first_iter = time.perf_counter(), trainer.start_iter
    trainer.train()
    save_train_time(output_dir, time.perf_counter() - start, cfg.SOLVER.MAX_ITER - first_iter)
    results = getattr(trainer, "_last_eval_results", None)
    if not results:
        results = DistillTrainer.test(cfg, trainer.model)
    bbox = dict(next(iter(results.values()))["bbox"]) if "bbox" not in results else dict(results["bbox"])
    save_stage_results(output_dir, bbox)
    return bbox


def _stage_worker(name: str, config_file: str, output_dir: str, opts: Sequence[str], threads: int) -> Dict:
    import torch
    from detectron2.utils.logger import setup_logger

    torch.set_num_threads(threads)
    # the stage's name instead of "d2" in front of each log line, as two stages interleave
    setup_logger(name="detectron2", abbrev_name=name)
    setup_logger(name="d2kd", abbrev_name=name)
    return train_and_evaluate(config_file, output_dir, opts)


def run_stages(stages: List[Tuple[str, str, str, Sequence[str]]], parallel: bool = True,
               threads: int = 0) -> List[Dict]:
    """Run independent ``(name, config_file, output_dir, opts)`` stages, one process per
    thread of the budget (:func:`cpu_threads` of ``threads``) at a time, and return their
    metrics in order.

    On a small CPU machine two single-threaded trainings finish sooner than the same two one
    after the other with two threads each (small convolutions do not scale across cores).
    A budget of one thread runs the stages one after the other, in this process.
    Finished stages are reused without starting a process.
    """
    todo = [s for s in stages if stage_results(s[2]) is None]
    budget = cpu_threads(threads)
    workers = min(len(todo), budget)
    if not parallel or workers < 2:
        import torch

        torch.set_num_threads(budget)
        return [train_and_evaluate(config, out, opts) for _, config, out, opts in stages]
    threads = cpu_threads(threads, side_by_side=workers)
    logger.info(f"{len(todo)} stages side by side: {workers} processes, {threads} CPU thread(s) each")
    # a fresh process per stage: its own logger set-up, and memory returned when it ends
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = [pool.submit(_stage_worker, *stage, threads) for stage in todo]
        for f in futures:
            f.result()  # re-raises a stage's error here
    return [stage_results(out) for _, _, out, _ in stages]


def run_comparison(teacher_config: str, student_config: str, distill_config: str, output_dir: str,
                   seed: int, teacher_seed: int = 0, distill_name: str = "gk", distill_opts: Sequence[str] = (),
                   threads: int = 0):
    """Teacher (``teacher_seed``), student alone and distilled student (``seed``), each a
    resumable stage under ``output_dir``; the distilled student learns from that teacher.
    The teacher and the student alone train side by side (splitting ``threads``, see
    :func:`run_stages`).

    Returns:
        (teacher, student, distilled) bbox metrics, and the teacher's checkpoint path.
    """
    teacher_dir = os.path.join(output_dir, f"teacher_seed{teacher_seed}")
    teacher, student = run_stages([
        ("teacher", teacher_config, teacher_dir, ["SEED", str(teacher_seed)]),
        ("student", student_config, os.path.join(output_dir, f"student_seed{seed}"), ["SEED", str(seed)]),
    ], threads=threads)
    teacher_weights = os.path.join(teacher_dir, "model_final.pth")
    distilled = train_and_evaluate(
        distill_config,
        os.path.join(output_dir, f"{distill_name}_seed{seed}"),
        ["SEED", str(seed), "DISTILL.TEACHER.WEIGHTS", teacher_weights, *distill_opts],
    )
    return teacher, student, distilled, teacher_weights


def comparison_table(teacher: Dict, student: Dict, distilled: Dict, name: str = "distilled (GK)") -> str:
    """Markdown table of the three models plus the gain and the share of the gap closed."""
    gain = distilled["AP"] - student["AP"]
    gap = teacher["AP"] - student["AP"]
    closed = f"{100 * gain / gap:.0f}%" if gap > 0 else "n/a (the teacher is not better)"
    lines = ["| model | AP | AP50 | AP75 |", "|---|---|---|---|"]
    for title, r in (("teacher", teacher), ("student alone", student), (name, distilled)):
        lines.append(f"| {title} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} |")
    lines += ["", f"gain over the student alone: {gain:+.1f} AP; share of the teacher-student gap closed: {closed}"]
    return "\n".join(lines)
