"""Build the frozen teacher from its own config and load its own checkpoint, strictly."""
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from ..checkpoint import IncompatibleCheckpointError, StrictDetectionCheckpointer

logger = logging.getLogger(__name__)


class TeacherConfigError(ValueError):
    """The teacher's config or checkpoint cannot serve the student (the message says why)."""


def num_classes_of(cfg) -> int:
    """Foreground classes predicted by the detector that ``cfg`` describes."""
    if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE:
        return cfg.MODEL.RETINANET.NUM_CLASSES
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def resolve_config_file(name: str) -> str:
    """A local yaml path, or a detectron2 model-zoo config name, to a readable local path."""
    if not name:
        raise TeacherConfigError(
            "DISTILL.TEACHER.CONFIG_FILE is empty: set it to the teacher's yaml, or to a "
            "detectron2 model-zoo name such as COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
        )
    if os.path.isfile(name):
        return name
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        raise TeacherConfigError(
            f"DISTILL.TEACHER.CONFIG_FILE = '{name}' is neither an existing file nor a "
            "detectron2 model-zoo config name (e.g. COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml)"
        ) from None


def build_teacher_cfg(student_cfg):
    """The teacher's own config: its file, then DISTILL.TEACHER.OPTS, on the student's device."""
    from d2kd.config import add_distill_config

    cfg = get_cfg()
    # A teacher yaml may itself be a d2kd config (e.g. a distilled student used as teacher).
    add_distill_config(cfg)
    cfg.merge_from_file(resolve_config_file(student_cfg.DISTILL.TEACHER.CONFIG_FILE))
    cfg.merge_from_list(list(student_cfg.DISTILL.TEACHER.OPTS))
    cfg.MODEL.DEVICE = student_cfg.MODEL.DEVICE
    cfg.MODEL.WEIGHTS = ""  # loaded below from DISTILL.TEACHER.WEIGHTS, strictly
    if cfg.MODEL.META_ARCHITECTURE.startswith("Distill"):
        raise TeacherConfigError(
            f"the teacher config {student_cfg.DISTILL.TEACHER.CONFIG_FILE} uses the "
            f"meta-architecture {cfg.MODEL.META_ARCHITECTURE}; a teacher must be a plain "
            "detector (export a distilled student with tools/export_student.py first)"
        )
    s_classes, t_classes = num_classes_of(student_cfg), num_classes_of(cfg)
    if s_classes != t_classes:
        raise TeacherConfigError(
            f"the teacher predicts {t_classes} classes but the student predicts {s_classes}: "
            "distillation needs the same label space. Train the teacher on the student's "
            "dataset, or fix MODEL.ROI_HEADS.NUM_CLASSES / MODEL.RETINANET.NUM_CLASSES "
            "(DISTILL.TEACHER.OPTS can override the teacher's)"
        )
    cfg.freeze()
    return cfg


def load_teacher_weights(teacher, weights: str) -> None:
    """Load ``weights`` into ``teacher`` with its own checkpointer; every mismatch is an error.

    The teacher gets its own checkpointer (so suffix matching never sees the student), and any
    missing, unexpected or mis-shaped key raises, listing them.
    """
    if not weights:
        raise TeacherConfigError(
            "DISTILL.TEACHER.WEIGHTS is empty: a teacher must be trained. Set it to the teacher's "
            "checkpoint (a path, a URL or a detectron2:// URI)"
        )
    try:
        local = PathManager.get_local_path(weights)
    except Exception as e:  # download errors come in many types; name the key in any case
        raise TeacherConfigError(
            f"DISTILL.TEACHER.WEIGHTS = '{weights}' could not be fetched: {e}"
        ) from e
    if not os.path.isfile(local):
        raise FileNotFoundError(
            f"DISTILL.TEACHER.WEIGHTS = '{weights}' does not exist. Train the teacher first, or "
            "point the key at its checkpoint"
        )
    try:
        StrictDetectionCheckpointer(teacher).load(local)
    except IncompatibleCheckpointError as e:
        raise TeacherConfigError(
            f"DISTILL.TEACHER.WEIGHTS = '{weights}' does not match the model built from "
            f"DISTILL.TEACHER.CONFIG_FILE; {e}"
        ) from None
    except RuntimeError as e:  # unreadable file, reported by the checkpointer's _load_file
        raise TeacherConfigError(f"DISTILL.TEACHER.WEIGHTS: {e}") from e
    logger.info(f"Loaded teacher weights from {weights}")


def build_teacher(student_cfg):
    """Build, load, freeze and return ``(teacher, teacher_cfg)``."""
    teacher_cfg = build_teacher_cfg(student_cfg)
    teacher = build_model(teacher_cfg)
    load_teacher_weights(teacher, student_cfg.DISTILL.TEACHER.WEIGHTS)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, teacher_cfg
