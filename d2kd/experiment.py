"""Train-and-evaluate stages that are skipped when done and resumed when interrupted.

Used by ``tools/demo.py`` and the multi-seed benchmark; each stage is an ordinary detectron2
training run in its own OUTPUT_DIR.
"""
import json
import logging
import os
from typing import Dict, Sequence

from detectron2.utils import comm

from .config import load_config
from .engine import DistillTrainer

logger = logging.getLogger("d2kd")

RESULTS_FILE = "final_results.json"


def stage_results(output_dir: str):
    """The saved results of a finished stage, or None."""
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def train_and_evaluate(config_file: str, output_dir: str, opts: Sequence[str] = ()) -> Dict:
    """Train ``config_file`` into ``output_dir`` and evaluate it; return the bbox metrics.

    Finished stages (``final_results.json`` present) are returned without work; an
    interrupted one resumes from its last checkpoint (training) or re-runs evaluation.
    """
    done = stage_results(output_dir)
    if done is not None:
        logger.info(f"Reusing finished stage {output_dir}")
        return done
    os.makedirs(output_dir, exist_ok=True)
    cfg = load_config(config_file, list(opts) + ["OUTPUT_DIR", output_dir])
    cfg.freeze()
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    if not results:
        results = DistillTrainer.test(cfg, trainer.model)
    bbox = dict(next(iter(results.values()))["bbox"]) if "bbox" not in results else dict(results["bbox"])
    if comm.is_main_process():
        tmp = os.path.join(output_dir, RESULTS_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(bbox, f, indent=1)
        os.replace(tmp, os.path.join(output_dir, RESULTS_FILE))
    return bbox
