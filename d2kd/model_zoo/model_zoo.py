"""d2kd's model zoo API, in the shape of ``detectron2.model_zoo``.

Names are config paths relative to d2kd's ``configs/`` folder, as detectron2's are relative to
its own (``"shapes/gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml"``; the ``.yaml`` may be left
out). The trained models are those the zoo's ``index.json`` lists (``d2kd://index.json``, see
handler.py for where that is); each is a release (d2kd.export) in ``d2kd://<name>/``.

    from d2kd import model_zoo
    model = model_zoo.get("shapes/gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml", trained=True)

A distillation config's trained model is its student, a plain detector: what ships.
"""
import difflib
import glob
import json
import os
from typing import Optional

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from ..checkpoint import AtomicDetectionCheckpointer, StrictDetectionCheckpointer
from ..config import load_config
from ..export import build_student, load_release_config
from ..modeling.kinds import is_distill_meta_arch
from .handler import PREFIX, ZooFileError, zoo_base

__all__ = ["get_config_file", "get_checkpoint_url", "get_config", "get", "read_index", "read_index_file", "configs_dir",
           "zoo_name", "INDEX", "INDEX_FORMAT"]

INDEX = "index.json"
INDEX_FORMAT = "d2kd-zoo/1"


def configs_dir() -> str:
    """d2kd's shipped ``configs/`` folder (beside the package in a checkout)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def zoo_name(config_path: str) -> str:
    """A config name as the zoo keys it: relative to configs/, no ``.yaml``."""
    name = config_path.replace(os.sep, "/")
    return name[: -len(".yaml")] if name.endswith(".yaml") else name


def _shipped_names():
    root = configs_dir()
    return sorted(zoo_name(os.path.relpath(p, root))
                  for p in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True))


def get_config_file(config_path: str) -> str:
    """The path of a shipped config, e.g. ``get_config_file("gk_faster_r50.yaml")``.

    Raises:
        RuntimeError: no such config (the message lists the closest names).
    """
    path = os.path.join(configs_dir(), zoo_name(config_path) + ".yaml")
    if not os.path.isfile(path):
        close = difflib.get_close_matches(zoo_name(config_path), _shipped_names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(c + '.yaml' for c in close)}?" if close else ""
        raise RuntimeError(f"{config_path} is not one of d2kd's configs (under {configs_dir()}){hint}")
    return path


def read_index_file(path: str) -> dict:
    """A zoo index file (publish.py writes it): ``{"format", "models": {name: entry}}``."""
    with open(path) as f:
        try:
            index = json.load(f)
        except ValueError as e:
            raise ZooFileError(f"{path} is not a d2kd zoo index: {e}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("models"), dict):
        raise ZooFileError(f"{path} is not a d2kd zoo index (expected format {INDEX_FORMAT})")
    return index


def read_index() -> dict:
    """The index of the ``d2kd://`` zoo (fetched again at every call: it changes)."""
    return read_index_file(PathManager.get_local_path(PREFIX + INDEX))


def get_checkpoint_url(config_path: str) -> str:
    """The ``d2kd://`` URI of the model trained with ``config_path``, as the zoo lists it.

    Raises:
        RuntimeError: the zoo has no trained model of that name (the message lists what it has).
    """
    name = zoo_name(config_path)
    try:
        models = read_index()["models"]
    except ZooFileError as e:
        raise RuntimeError(f"the d2kd zoo at {zoo_base()} has no readable index: {e}") from None
    if name not in models:
        listed = ", ".join(sorted(models)) or "nothing yet"
        raise RuntimeError(f"the d2kd zoo at {zoo_base()} has no trained model for {config_path} "
                           f"(it has: {listed}). Publish one with tools/export_student.py --zoo")
    return f"{PREFIX}{name}/{models[name]['weights']}"


def get_config(config_path: str, trained: bool = False) -> CfgNode:
    """A config for a model of the zoo.

    Args:
        trained: False: the shipped config itself (the training config, DISTILL node included),
            via d2kd's ``load_config``. True: the published release's own config (the student,
            a plain detector) with ``MODEL.WEIGHTS`` set to :func:`get_checkpoint_url`.
    """
    if not trained:
        return load_config(get_config_file(config_path))
    url = get_checkpoint_url(config_path)
    cfg = load_release_config(PathManager.get_local_path(f"{PREFIX}{zoo_name(config_path)}/config.yaml"))
    cfg.MODEL.WEIGHTS = url
    return cfg


def get(config_path: str, trained: bool = False, device: Optional[str] = None):
    """A model of the zoo, like ``detectron2.model_zoo.get`` (in training mode: call ``eval()``
    to predict).

    Args:
        trained: True: the published model, loaded strictly (every key must match) from the
            zoo (downloaded and md5-checked once, then cached). False: the model the config
            trains, initialised from its ``MODEL.WEIGHTS``; for a distillation config that is
            the student alone (the teacher is a training-time companion, not part of the model).
        device: default "cpu" when CUDA is not available.
    """
    cfg = get_config(config_path, trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        cfg.MODEL.DEVICE = device
    if trained:
        model = build_model(cfg)
        StrictDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        return model
    model = build_student(cfg) if is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE) else build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model
