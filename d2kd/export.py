"""Turn a distillation checkpoint into a plain detectron2 release of the student."""
import hashlib
import io
import logging
import os
from typing import Tuple

import torch
from detectron2.config import CfgNode

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from .modeling.kinds import plain_meta_arch_of
from .utils.atomic import atomic_write

logger = logging.getLogger(__name__)

# State that belongs to distillation, not to the student.
DISTILL_STATE_PREFIXES = ("distill_heads.", "prototype_bank.")


def student_config(cfg: CfgNode) -> CfgNode:
    """The student's own config: a vanilla meta-architecture and no ``DISTILL`` node."""
    out = cfg.clone()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = plain_meta_arch_of(cfg.MODEL.META_ARCHITECTURE)
    if "DISTILL" in out:
        del out["DISTILL"]
    return out


def student_state_dict(checkpoint_path: str) -> dict:
    """The student's weights from a d2kd training checkpoint (adapters and prototypes dropped)."""
    try:
        # weights_only: a release tool must not execute code from the file it converts
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"could not read the distillation checkpoint '{checkpoint_path}' ({type(e).__name__}: "
            f"{e}); it is corrupt, truncated, or not a d2kd checkpoint"
        ) from e
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise RuntimeError(f"'{checkpoint_path}' holds no model weights")
    return {k: v for k, v in state.items() if not k.startswith(DISTILL_STATE_PREFIXES)}


def export_student(cfg: CfgNode, checkpoint_path: str, output_dir: str, name: str = "model_final") -> Tuple[str, str]:
    """Write ``<name>_<md5[:6]>.pth`` and ``config.yaml`` for the student into ``output_dir``.

    The weights file is named like detectron2's model zoo files (a content-hash suffix, so a
    changed file never hides behind an old name); the config names it in ``MODEL.WEIGHTS``.

    Returns:
        (weights path, config path)
    """
    os.makedirs(output_dir, exist_ok=True)
    state = student_state_dict(checkpoint_path)
    buffer = io.BytesIO()
    torch.save({"model": state, "__author__": "d2kd export_student"}, buffer)
    data = buffer.getvalue()
    digest = hashlib.md5(data).hexdigest()[:6]
    weights_path = os.path.join(output_dir, f"{name}_{digest}.pth")
    atomic_write(weights_path, data)

    scfg = student_config(cfg)
    scfg.MODEL.WEIGHTS = os.path.abspath(weights_path)
    config_path = os.path.join(output_dir, "config.yaml")
    atomic_write(config_path, scfg.dump())
    logger.info(f"Exported the student to {weights_path} and {config_path}")
    return weights_path, config_path


class StudentCheckpointer(DetectionCheckpointer):
    """Loads a d2kd training checkpoint into the plain student, leaving out what belongs to
    distillation (adapters, prototypes) instead of reporting it as unexpected keys."""

    def _load_model(self, checkpoint):
        model_state = checkpoint.get("model", {})
        checkpoint["model"] = {k: v for k, v in model_state.items() if not k.startswith(DISTILL_STATE_PREFIXES)}
        return super()._load_model(checkpoint)


def build_student(cfg: CfgNode):
    """The student of a distillation config as the plain detector it is, without building or
    loading the teacher (evaluation and export never run it); weights not loaded."""
    return build_model(student_config(cfg))
