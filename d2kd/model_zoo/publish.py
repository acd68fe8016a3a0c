"""Publishing a verified release into a zoo directory, and the zoo's index and table.

A zoo is a directory (served as is over http(s), or read directly) holding

* ``<name>/``: one release per model (d2kd.export: ``<stem>_<md5[:6]>.pth``, ``config.yaml``,
  ``release.json``, and ``<stem>_<md5[:6]>.ts`` when traced), ``<name>`` being the config's
  name relative to d2kd's ``configs/`` without ``.yaml``;
* ``index.json``: ``{"format": "d2kd-zoo/1", "models": {name: entry}}``, each entry saying
  what the model is (config, teacher, dataset), what it was evaluated with (metrics), what it
  costs (parameters, GFLOPs, latency) and where it is (weights, md5);
* ``MODEL_ZOO.md``: the index as a table, regenerated at every publish.

A release is verified before it is published (a process without d2kd loads it strictly and
predicts what the student predicts, the TorchScript file included); the index is rewritten
atomically under a file lock, after the release is in place, so the index never names a file
that is not there.
"""
import json
import math
import os
import time
from typing import Any, Dict, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from iopath.common.file_io import file_lock

from ..checkpoint import StrictDetectionCheckpointer
from ..export import ExportResult, export_release, load_release_config, read_manifest
from ..modeling.kinds import is_distill_meta_arch
from ..utils.atomic import atomic_write
from ..utils.inference_cost import gflops_per_image, parameter_count
from .model_zoo import INDEX, INDEX_FORMAT, configs_dir, read_index_file, zoo_name
from .payoff import release_latency
from .table import zoo_table

__all__ = ["publish", "update_index", "load_index", "teacher_zoo_name"]

TABLE = "MODEL_ZOO.md"


def load_index(zoo_dir: str) -> dict:
    path = os.path.join(zoo_dir, INDEX)
    return read_index_file(path) if os.path.isfile(path) else {"format": INDEX_FORMAT, "models": {}}


def teacher_zoo_name(cfg: CfgNode) -> Optional[str]:
    """The zoo name of a distillation config's teacher when it is one of d2kd's shipped configs
    (the name it is published under), else None."""
    if not is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE) or not cfg.DISTILL.TEACHER.CONFIG_FILE:
        return None
    path = os.path.abspath(cfg.DISTILL.TEACHER.CONFIG_FILE)
    root = configs_dir()
    return zoo_name(os.path.relpath(path, root)) if path.startswith(root + os.sep) else None


def update_index(zoo_dir: str, name: str, entry: Dict[str, Any]) -> dict:
    """Put ``entry`` under ``name`` in the zoo's index (atomically, under a file lock) and
    regenerate the zoo's MODEL_ZOO.md; returns the new index."""
    path = os.path.join(zoo_dir, INDEX)
    with file_lock(path):
        index = load_index(zoo_dir)
        index["models"][name] = entry
        index["models"] = dict(sorted(index["models"].items()))
        atomic_write(path, json.dumps(index, indent=1) + "\n")
        atomic_write(os.path.join(zoo_dir, TABLE), zoo_table(index))
    return index


def _release_cost(result: ExportResult, images: Sequence[str]) -> Dict[str, Any]:
    """Parameters and GFLOPs of the published model, built from the release as a consumer
    builds it."""
    import cv2

    from ..deploy import test_time_input

    cfg = load_release_config(result.config_path)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    StrictDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    inputs = [test_time_input(cv2.imread(f), cfg) for f in images[:4]]
    return {"params": parameter_count(model), "gflops": round(gflops_per_image(model, inputs), 4),
            "input_size": list(inputs[0].shape[1:])}


def publish(zoo_dir: str, config_name: str, cfg: CfgNode, checkpoint_path: str, *, images: Sequence[str],
            formats: Sequence[str] = ("torchscript",), metrics: Optional[Dict[str, float]] = None,
            teacher: Optional[str] = None, train_time_s: Optional[float] = None,
            latency_images: Sequence[str] = (), latency_threads: Sequence[int] = (1, 2)) -> Dict[str, Any]:
    """Export ``checkpoint_path`` (trained with ``cfg``) as a verified release into
    ``<zoo_dir>/<name>/`` and list it in the zoo's index.

    Args:
        config_name: the config's name (relative to configs/, or any name for an own config).
        images: verification images (the release is checked on them before publishing).
        metrics: what the model was evaluated with (e.g. the bbox AP dict), stored as given.
        teacher: the teacher's zoo name or URI; default: the zoo name of a shipped teacher config.
        latency_images: images to time the release on, eager and TorchScript, at each of
            ``latency_threads`` (payoff.release_latency); none: no latency is recorded.

    Returns:
        the index entry.
    """
    name = zoo_name(config_name)
    teacher = teacher or teacher_zoo_name(cfg)
    if teacher and "://" not in teacher:
        listed = load_index(zoo_dir)["models"].get(teacher)
        if listed:
            teacher = f"d2kd://{teacher}/{listed['weights']}"
    dataset = {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)}
    # COCOeval gives NaN for an area range without boxes: null in the JSON, not a bare NaN
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in (metrics or {}).items()} or None
    info = {"name": name, "metrics": metrics, "teacher": teacher, "dataset": dataset}
    result = export_release(cfg, checkpoint_path, os.path.join(zoo_dir, name), name=os.path.basename(name),
                            images=images, formats=formats, info=info)
    manifest = read_manifest(os.path.dirname(result.config_path))
    weights = os.path.basename(result.weights_path)
    entry = {
        "config": name + ".yaml",
        "distilled": is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE),
        "heads": list(cfg.DISTILL.HEADS) if is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE) else [],
        "teacher": teacher,
        "dataset": dataset,
        "metrics": metrics,
        "train_time_s": train_time_s,
        "latency_ms": release_latency(os.path.dirname(result.config_path), latency_images, latency_threads)
        if latency_images else None,
        "weights": weights,
        "md5": manifest["files"][weights],
        "torchscript": os.path.basename(result.torchscript_path) if result.torchscript_path else None,
        "needs": result.release.notes or ["stock detectron2 only"],
        "check": result.check,
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
    }
    entry.update(_release_cost(result, images))
    update_index(zoo_dir, name, entry)
    return entry
