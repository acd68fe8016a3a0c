"""The ``cfg.DISTILL`` node: teacher, enabled heads, per-head weights, schedule, prototypes."""
from detectron2.config import CfgNode as CN


def add_distill_config(cfg):
    """Add the ``DISTILL`` node (and nothing else) to a detectron2 config, in place.

    Call it on ``get_cfg()`` before ``merge_from_file``; every key has a default, so a config
    that names no distillation keys still loads.
    """
    _C = cfg
    _C.DISTILL = CN()

    _C.DISTILL.TEACHER = CN()
    # The teacher's own detectron2 config: a local yaml, or a model-zoo name such as
    # "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml".
    _C.DISTILL.TEACHER.CONFIG_FILE = ""
    # The teacher's trained weights: a path, a URL, or a detectron2:// URI. Required.
    _C.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides applied to the teacher's config after loading it, as KEY VALUE pairs.
    _C.DISTILL.TEACHER.OPTS = []

    # Names of registered distillation heads to enable (any number; see DISTILL_HEAD_REGISTRY).
    _C.DISTILL.HEADS = []

    _C.DISTILL.SCHEDULE = CN()
    # Iterations of plain student training before any distillation loss is applied.
    _C.DISTILL.SCHEDULE.START_ITER = 0
    # Multiply the decaying terms of every head that enables DECAY by (1 - iter / MAX_ITER).
    _C.DISTILL.SCHEDULE.LINEAR_DECAY = False

    # FitNet: lambda * mean((A(F_s) - F_t)^2) over whole FPN maps (METHODS.md section 5).
    _C.DISTILL.FITNET = CN()
    _C.DISTILL.FITNET.WEIGHT = 1.0
    # Strides to distil; empty means every stride that student and teacher both have.
    _C.DISTILL.FITNET.STRIDES = []
    # Adapter on the student side: "auto" (only when channels differ) or "always".
    _C.DISTILL.FITNET.ADAPTER = "auto"
    _C.DISTILL.FITNET.ADAPTER_KERNEL = 1
    _C.DISTILL.FITNET.ADAPTER_RELU = False
    # Weight the cells covered by each GT box by its GK robust weight (GK paper, Table 4).
    _C.DISTILL.FITNET.ROBUST_WEIGHTS = False
    # Follow DISTILL.SCHEDULE.LINEAR_DECAY.
    _C.DISTILL.FITNET.DECAY = True

    # Vanilla KD on class logits: RoI logits on shared proposals (R-CNN) or positive anchors'
    # class logits (RetinaNet).
    _C.DISTILL.KD = CN()
    _C.DISTILL.KD.WEIGHT = 1.0
    _C.DISTILL.KD.TEMPERATURE = 2.0
    # Weight positive RoIs / anchors by the robust weight of their matched GT (GK Table 4).
    _C.DISTILL.KD.ROBUST_WEIGHTS = False
    _C.DISTILL.KD.DECAY = False

    # Prototype generation (GK's PGM, METHODS.md section 1.2-1.3); used by the GK head and by
    # any head with ROBUST_WEIGHTS on.
    _C.DISTILL.PROTOTYPES = CN()
    # K, prototypes per class and level.
    _C.DISTILL.PROTOTYPES.NUM = 10
    # Weight of the teacher-student consistency term in matching pursuit.
    _C.DISTILL.PROTOTYPES.ALPHA = 10.0
    # Iteration of the first build, and rebuild period in iterations (0: never rebuild).
    _C.DISTILL.PROTOTYPES.START_ITER = 0
    _C.DISTILL.PROTOTYPES.PERIOD = 0
    # Images sampled per class (each holds the class), fixed for the whole run; boxes whose
    # width and height exceed MIN_SIZE original-image pixels are used (the authors: 800, 30).
    _C.DISTILL.PROTOTYPES.MAX_IMAGES = 800
    _C.DISTILL.PROTOTYPES.MIN_SIZE = 30
    # Strides whose prototypes are built; empty means every stride both models have.
    _C.DISTILL.PROTOTYPES.STRIDES = []

    # Global Knowledge distillation (GK's RDM, METHODS.md section 1.4-1.5).
    _C.DISTILL.GK = CN()
    # Paper weights (global, local feature, local response) = (1, 1, 5).
    _C.DISTILL.GK.GLOBAL_WEIGHT = 1.0
    _C.DISTILL.GK.FEATURE_WEIGHT = 1.0
    _C.DISTILL.GK.RESPONSE_WEIGHT = 5.0
    # Relative weights of the foreground and background parts of the local feature loss.
    _C.DISTILL.GK.FG_WEIGHT = 1.0
    _C.DISTILL.GK.BG_WEIGHT = 4.0
    _C.DISTILL.GK.TEMPERATURE = 2.0
    _C.DISTILL.GK.STRIDES = []
    # Student-side adapter before the feature term: a kernel x kernel conv, then "relu",
    # "none", or "auto" (the authors': none for two-stage students, ReLU for dense ones).
    _C.DISTILL.GK.ADAPTER_KERNEL = 3
    _C.DISTILL.GK.ADAPTER_ACTIVATION = "auto"
    # Instances for the mask, robust weights and global term: "positive_rois" (the student's
    # foreground sampled RoIs with their matched classes, the authors' Faster R-CNN choice),
    # "gt" (GT boxes), or "auto" (positive_rois for two-stage students, gt for dense ones).
    _C.DISTILL.GK.INSTANCES = "auto"
    # Rows of the response KL for two-stage students: "positive" RoIs (authors) or "all".
    _C.DISTILL.GK.RESPONSE_ROIS = "positive"
    # Feature term over levels: "mean", "sum", or "auto" (authors: mean two-stage, sum dense).
    _C.DISTILL.GK.LEVEL_REDUCTION = "auto"
    # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the reference decays global and feature terms only).
    _C.DISTILL.GK.DECAY = True
    return cfg


class TeacherConfigError(ValueError):
    """The teacher's config or checkpoint cannot serve the student (the message says why)."""


def resolve_teacher_config_file(name: str, relative_to: str = "") -> str:
    """The one place a ``DISTILL.TEACHER.CONFIG_FILE`` value becomes a readable local path.

    Tried in order: a path relative to ``relative_to`` (the directory of the yaml that wrote
    it, as detectron2 resolves ``_BASE_``), a path as given (absolute or relative to the
    working directory), a detectron2 model-zoo config name.
    """
    import os

    if not name:
        raise TeacherConfigError(
            "DISTILL.TEACHER.CONFIG_FILE is empty: set it to the teacher's yaml, or to a "
            "detectron2 model-zoo name such as COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
        )
    if relative_to and not os.path.isabs(name):
        beside = os.path.join(relative_to, name)
        if os.path.isfile(beside):
            return os.path.abspath(beside)
    if os.path.isfile(name):
        return os.path.abspath(name)
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        raise TeacherConfigError(
            f"DISTILL.TEACHER.CONFIG_FILE = '{name}' is neither an existing file nor a "
            "detectron2 model-zoo config name (e.g. COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml)"
        ) from None


def load_config(config_file: str, opts=()):
    """``get_cfg()`` + ``DISTILL`` + the yaml + KEY VALUE overrides, as train_net.py does.

    A relative ``DISTILL.TEACHER.CONFIG_FILE`` written in a yaml is resolved against that
    yaml's directory (like detectron2's ``_BASE_``), so configs work from any working
    directory; one given in ``opts`` is taken as the user typed it. Model-zoo names are kept
    as names (resolved when the teacher is built).
    """
    import os

    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.merge_from_file(config_file)
    teacher = cfg.DISTILL.TEACHER.CONFIG_FILE
    if teacher and not os.path.isabs(teacher):
        beside = os.path.join(os.path.dirname(os.path.abspath(config_file)), teacher)
        if os.path.isfile(beside):
            cfg.DISTILL.TEACHER.CONFIG_FILE = resolve_teacher_config_file(beside)
    cfg.merge_from_list(list(opts))
    return cfg
