"""Build the frozen teacher from its own config and load its own checkpoint, strictly."""
import logging
import os

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from torch import nn

from ..checkpoint import (
    DISTILL_STATE_PREFIXES,
    CheckpointReadError,
    IncompatibleCheckpointError,
    StrictDetectionCheckpointer,
    UntrustedPickleError,
    check_pickle_allowed,
    is_trusted_pickle,
)
from ..config import DEFAULT_TEACHER, TeacherConfigError, add_distill_config, resolve_teacher_config_file, teacher_key, teacher_nodes
from .box_head_on import check_cascade_stage
from .kinds import DetectorKind, is_distill_meta_arch, kind_of
from .lazy_teacher import (
    NUM_CLASSES_KEYS,
    LazyTeacherConfig,
    build_lazy_teacher_cfg,
    build_lazy_teacher_model,
    is_lazy_config_file,
)

logger = logging.getLogger(__name__)

__all__ = ["TeacherConfigError", "build_teacher_cfg", "build_teacher", "load_teacher_weights"]


def build_teacher_cfg(student_cfg, name: str = DEFAULT_TEACHER):
    """The teacher's own config: its file, then DISTILL.TEACHER.OPTS, on the student's device
    (``name``: a teacher of ``DISTILL.TEACHERS``, its node's keys instead).

    A yaml gives a frozen yacs config; a ``.py`` LazyConfig a :class:`LazyTeacherConfig`
    (its OPTS are LazyConfig "key=value" overrides), which has the keys d2kd reads of a
    teacher's config (``MODEL.META_ARCHITECTURE``, ``MODEL.DEVICE``, ``INPUT.FORMAT``).
    """
    node, key = teacher_nodes(student_cfg)[name], teacher_key(name)
    file_name = node.CONFIG_FILE
    try:
        path = resolve_teacher_config_file(file_name)
    except TeacherConfigError as e:
        if name == DEFAULT_TEACHER:
            raise
        raise TeacherConfigError(str(e).replace("DISTILL.TEACHER.", f"{key}.")) from None
    if is_lazy_config_file(path):
        return build_lazy_teacher_cfg(path, list(node.OPTS), student_cfg.MODEL.DEVICE,
                                      shown_name=file_name)
    cfg = get_cfg()
    # A teacher yaml may itself be a d2kd config (e.g. a distilled student used as teacher).
    add_distill_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(node.OPTS))
    cfg.MODEL.DEVICE = student_cfg.MODEL.DEVICE
    cfg.MODEL.WEIGHTS = ""  # loaded from its WEIGHTS key, strictly
    if is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE):
        raise TeacherConfigError(
            f"the teacher config {file_name} ({key}.CONFIG_FILE) uses the "
            f"meta-architecture {cfg.MODEL.META_ARCHITECTURE}; a teacher must be a plain "
            "detector (export a distilled student with tools/export_student.py first)"
        )
    cfg.freeze()
    return cfg


def build_teacher(student_cfg, name: str = DEFAULT_TEACHER):
    """Build the teacher (not yet loaded) and return ``(teacher, teacher_cfg, kind)``; ``name``
    picks one of ``DISTILL.TEACHERS`` instead of ``DISTILL.TEACHER``."""
    node = teacher_nodes(student_cfg)[name]
    teacher_cfg = build_teacher_cfg(student_cfg, name)
    if isinstance(teacher_cfg, LazyTeacherConfig):
        teacher = build_lazy_teacher_model(teacher_cfg, shown_name=node.CONFIG_FILE)
        if is_distill_meta_arch(type(teacher).__name__):
            raise TeacherConfigError(
                f"the LazyConfig teacher {node.CONFIG_FILE} builds a "
                f"{type(teacher).__name__}; a teacher must be a plain detector"
            )
        # for messages that name the key setting the teacher's class count (check_same_classes)
        teacher.lazy_config_file = node.CONFIG_FILE
    else:
        teacher = build_model(teacher_cfg)
    kind = kind_of(teacher)
    if kind is None:
        raise TeacherConfigError(
            f"the teacher's meta-architecture {teacher_cfg.MODEL.META_ARCHITECTURE} is neither a "
            "two-stage detector (GeneralizedRCNN with an RPN) nor a dense one (a DenseDetector "
            "such as RetinaNet); d2kd cannot read its outputs"
        )
    roi_heads = getattr(teacher, "roi_heads", None)
    if roi_heads is not None:
        try:
            check_cascade_stage(roi_heads, node.CASCADE_STAGE)
        except ValueError as e:
            raise TeacherConfigError(str(e) if name == DEFAULT_TEACHER else f"{teacher_key(name)}: {e}") from None
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, teacher_cfg, kind


def check_same_classes(student: nn.Module, student_kind: DetectorKind, teacher: nn.Module,
                       teacher_kind: DetectorKind, key: str = "DISTILL.TEACHER") -> None:
    s_classes, t_classes = student_kind.num_classes(student), teacher_kind.num_classes(teacher)
    if s_classes != t_classes:
        lazy = getattr(teacher, "lazy_config_file", "")
        teacher_key = (f"{NUM_CLASSES_KEYS.get(teacher_kind.name, 'class count')} in its LazyConfig {lazy}"
                       if lazy else teacher_kind.num_classes_key or "class count")
        raise TeacherConfigError(
            f"the teacher{'' if key == 'DISTILL.TEACHER' else f' {key}'} predicts {t_classes} classes but the student predicts {s_classes}: "
            "distillation needs the same label space. Train the teacher on the student's "
            f"dataset, or fix the student's {student_kind.num_classes_key or 'class count'} / the "
            f"teacher's {teacher_key} ({key}.OPTS can "
            "override the teacher's)"
        )


def load_teacher_weights(teacher, weights: str, allow_pickle: bool = False, key: str = "DISTILL.TEACHER") -> str:
    """Load ``weights`` into ``teacher`` with its own checkpointer; every mismatch is an error.
    Returns the local file read (a download's cache path for a URL).

    The teacher gets its own checkpointer (so suffix matching never sees the student), and any
    missing, unexpected or mis-shaped key raises, summarised. A ``.pth`` is read with
    ``weights_only=True``; a ``.pkl`` only from detectron2's model zoo unless ``allow_pickle``
    (``DISTILL.TEACHER.ALLOW_PICKLE``). ``key``: the teacher's config node, named in the errors.
    """
    if not weights:
        raise TeacherConfigError(
            f"{key}.WEIGHTS is empty: a teacher must be trained. Set it to the teacher's "
            "checkpoint (a path, a URL or a detectron2:// URI)"
        )
    try:
        check_pickle_allowed(weights, allow_pickle, key=f"{key}.WEIGHTS", allow_key=f"{key}.ALLOW_PICKLE")
    except UntrustedPickleError as e:
        raise TeacherConfigError(str(e)) from None
    try:
        local = PathManager.get_local_path(weights)
    except Exception as e:  # download errors come in many types; name the key in any case
        raise TeacherConfigError(
            f"{key}.WEIGHTS = '{weights}' could not be fetched: {e}"
        ) from None  # the message carries the cause; a chained traceback would print it twice
    if os.path.isdir(local):
        found = sorted(f for f in os.listdir(local) if f.endswith((".pth", ".pkl")))
        example = "model_final.pth" if "model_final.pth" in found else (found[-1] if found else "")
        raise IsADirectoryError(
            f"{key}.WEIGHTS = '{weights}' is a directory, not a checkpoint file. Point "
            "the key at the teacher's checkpoint in it"
            + (f", e.g. {os.path.join(weights, example)}" if example else " (it holds no .pth or .pkl file)")
        )
    if not os.path.isfile(local):
        raise FileNotFoundError(
            f"{key}.WEIGHTS = '{weights}' does not exist. Train the teacher first, or "
            "point the key at its checkpoint"
        )
    try:
        # the check above judged the path the user gave; ``local`` may be a download cache
        trusted = allow_pickle or is_trusted_pickle(weights)
        StrictDetectionCheckpointer(teacher, allow_pickle=trusted).load(local)
    except IncompatibleCheckpointError as e:
        fix = (
            f"Point {key}.WEIGHTS at the teacher's own checkpoint (its OUTPUT_DIR/"
            "model_final.pth); to use a distilled student as a teacher, export it with "
            "tools/export_student.py and use the exported config and weights"
            if any(k.startswith(DISTILL_STATE_PREFIXES) for k in e.unexpected)
            else f"Point {key}.CONFIG_FILE at the config the teacher was trained with, "
            f"or {key}.WEIGHTS at the teacher trained with that config"
        )
        raise TeacherConfigError(
            f"{key}.WEIGHTS = '{weights}' does not match the model built from "
            f"{key}.CONFIG_FILE: {e}. {fix}"
        ) from None
    except CheckpointReadError as e:
        raise TeacherConfigError(
            f"{key}.WEIGHTS: {e}. Copy the teacher's checkpoint again, or point the key "
            "at another (e.g. the teacher's OUTPUT_DIR/model_final.pth)"
        ) from None  # torch's own text (kept as __context__) advises weights_only=False
    logger.info(f"Loaded teacher weights from {weights}" + ("" if key == "DISTILL.TEACHER" else f" ({key})"))
    return local
