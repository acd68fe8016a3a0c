"""The ``cfg.DISTILL`` node: teacher, enabled heads, schedule, prototypes.

Each distillation head owns its own node (``cfg.DISTILL.<NAME>``, added by the head class's
``add_config`` in its own file); ``add_distill_config`` collects the nodes of every head
registered when it runs, so a new method touches its head file, its configs and its tests only.
"""
import copy

from detectron2.config import CfgNode as CN


def add_distill_config(cfg):
    """Add the ``DISTILL`` node (and ``MODEL.GFL``, see add_gfl_config) to a detectron2 config,
    in place.

    Call it on ``get_cfg()`` before ``merge_from_file``; every key has a default, so a config
    that names no distillation keys still loads. The heads' nodes come from the heads registered
    at the time of the call: import a module that registers a head of your own before this.
    """
    _C = cfg
    _C.DISTILL = CN()

    _C.DISTILL.TEACHER = CN()
    # The teacher's own detectron2 config: a local yaml or .py LazyConfig, or a model-zoo name
    # such as "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml" / "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py".
    _C.DISTILL.TEACHER.CONFIG_FILE = ""
    # The teacher's trained weights: a path, a URL, or a detectron2:// URI. Required.
    _C.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides applied to the teacher's config after loading it: KEY VALUE pairs for a yaml,
    # "key=value" strings for a .py LazyConfig (e.g. "model.roi_heads.num_classes=6").
    _C.DISTILL.TEACHER.OPTS = []
    # Load .pkl TEACHER.WEIGHTS / MODEL.WEIGHTS from outside detectron2's model zoo (unpickling runs code).
    _C.DISTILL.TEACHER.ALLOW_PICKLE = False
    # A Cascade R-CNN teacher's class scores on given boxes (KD, GK's response term, DeFeat):
    # -1 the cascade's own inference score (the mean of its stages' probabilities, as logits
    # log p), or k for stage k's logits (d2kd/modeling/box_head_on.py). Ignored otherwise.
    _C.DISTILL.TEACHER.CASCADE_STAGE = -1
    # More teachers, by name: DISTILL.TEACHERS.<NAME> with the keys of DISTILL.TEACHER (a yaml adds
    # the node; load_config fills the keys it omits). A head reads the one its node's TEACHER names.
    _C.DISTILL.TEACHERS = CN(new_allowed=True)

    # Names of registered distillation heads to enable (any number; see DISTILL_HEAD_REGISTRY).
    _C.DISTILL.HEADS = []

    _C.DISTILL.SCHEDULE = CN()
    # Iterations of plain student training before any distillation loss is applied.
    _C.DISTILL.SCHEDULE.START_ITER = 0
    # Multiply the decaying terms of every head that enables DECAY by (1 - iter / MAX_ITER).
    _C.DISTILL.SCHEDULE.LINEAR_DECAY = False

    # Prototype generation (GK's PGM, docs/METHODS.md section 1.2-1.3); used by the GK head and by
    # any head with ROBUST_WEIGHTS on.
    _C.DISTILL.PROTOTYPES = CN()
    # K, prototypes per class and level.
    _C.DISTILL.PROTOTYPES.NUM = 10
    # Weight of the teacher-student consistency term in matching pursuit.
    _C.DISTILL.PROTOTYPES.ALPHA = 10.0
    # Iteration of the first build, and rebuild period in iterations (0: never rebuild).
    _C.DISTILL.PROTOTYPES.START_ITER = 0
    _C.DISTILL.PROTOTYPES.PERIOD = 0
    # The same in epochs of DATASETS.TRAIN (its images after detectron2's filtering over
    # SOLVER.IMS_PER_BATCH, rounded up to whole iterations; the paper refreshes every epoch).
    # When > 0 each replaces its iteration key above (0: use START_ITER / PERIOD).
    _C.DISTILL.PROTOTYPES.START_EPOCHS = 0.0
    _C.DISTILL.PROTOTYPES.PERIOD_EPOCHS = 0.0
    # Images sampled per class (each holds the class), fixed for the whole run; boxes whose
    # width and height exceed MIN_SIZE original-image pixels are used (the authors: 800, 30).
    _C.DISTILL.PROTOTYPES.MAX_IMAGES = 800
    _C.DISTILL.PROTOTYPES.MIN_SIZE = 30
    # Strides whose prototypes are built; empty means every stride both models have.
    _C.DISTILL.PROTOTYPES.STRIDES = []
    # Memory bound (bytes) on the |candidates| x N inner products PGM may keep between pursuit
    # steps (select_prototypes' cache_bytes; above it they are recomputed, or the D x D
    # moment form is used, whichever is cheaper: the picks are the same).
    _C.DISTILL.PROTOTYPES.CACHE_BYTES = 4 << 30
    # Where builds get instance features: "images" (the paper: re-extracted from the fixed
    # per-class image subset) or "online" (pooled from the training steps' own features).
    _C.DISTILL.PROTOTYPES.SOURCE = "images"
    # With SOURCE "online": instances kept per class (at every stride), the latest first.
    _C.DISTILL.PROTOTYPES.ONLINE_CAPACITY = 1000
    # With SOURCE "images": bytes of read and resized images each rank keeps across builds (0: none).
    _C.DISTILL.PROTOTYPES.IMAGE_CACHE_BYTES = 1 << 30

    # every registered head's own node (imported here: the heads package imports this module's
    # callers, never the reverse at import time)
    from .heads.registry import add_head_configs

    add_head_configs(cfg)
    add_gfl_config(cfg)  # so every d2kd config loader knows d2kd's GFL meta-architecture
    return cfg


def add_gfl_config(cfg):
    """Add ``MODEL.GFL``, the config of d2kd's GFL meta-architecture, in place.

    ``add_distill_config`` calls it. To run a GFL config in stock detectron2: ``import d2kd``
    (registers "GFL"), ``cfg = get_cfg(); add_gfl_config(cfg); cfg.merge_from_file(...)``.
    """
    _C = cfg
    _C.MODEL.GFL = CN()
    _C.MODEL.GFL.NUM_CLASSES = 80
    _C.MODEL.GFL.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Convs (3x3 + norm + ReLU) in each of the class and box towers, shared across levels.
    _C.MODEL.GFL.NUM_CONVS = 4
    # "GN" (GFL's: 32 groups), "BN" / "SyncBN" (one per level, as RetinaNet's head), or "".
    # GN needs more than one value per group: with 32 channels and 1x1 maps (p7 of images up
    # to 128 px) it fails at batch-1 inference; use BN there.
    _C.MODEL.GFL.NORM = "GN"
    _C.MODEL.GFL.PRIOR_PROB = 0.01
    # n: each box edge is a distribution over {0..n} stride units from the anchor centre.
    _C.MODEL.GFL.REG_MAX = 16
    # One square anchor per location, of side OCTAVE_BASE_SCALE x stride (MODEL.ANCHOR_GENERATOR
    # is not read, except its OFFSET); ATSS assigns with TOPK candidates per level.
    _C.MODEL.GFL.OCTAVE_BASE_SCALE = 8.0
    _C.MODEL.GFL.TOPK = 9
    # Quality focal loss beta and the loss weights (GFL's: QFL 1, DFL 0.25, GIoU 2).
    _C.MODEL.GFL.QFL_BETA = 2.0
    _C.MODEL.GFL.QFL_WEIGHT = 1.0
    _C.MODEL.GFL.DFL_WEIGHT = 0.25
    _C.MODEL.GFL.GIOU_WEIGHT = 2.0
    # Inference (GFL's test settings: score 0.05, 1000 candidates per level, NMS 0.6, 100 boxes).
    _C.MODEL.GFL.SCORE_THRESH_TEST = 0.05
    _C.MODEL.GFL.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.GFL.NMS_THRESH_TEST = 0.6
    _C.MODEL.GFL.MAX_DETECTIONS_PER_IMAGE = 100
    return cfg


class TeacherConfigError(ValueError):
    """The teacher's config or checkpoint cannot serve the student (the message says why)."""


def resolve_teacher_config_file(name: str, relative_to: str = "") -> str:
    """The one place a ``DISTILL.TEACHER.CONFIG_FILE`` value becomes a readable local path.

    Tried in order: a ``d2kd://`` URI (a release's config.yaml in d2kd's model zoo, fetched
    through detectron2's PathManager), a path relative to ``relative_to`` (the directory of
    the yaml that wrote it, as detectron2 resolves ``_BASE_``), a path as given (absolute or
    relative to the working directory), a detectron2 model-zoo config name. Any of them may be
    a ``.py`` LazyConfig (d2kd.modeling.lazy_teacher), except a ``d2kd://`` release's config.
    """
    import os

    if not name:
        raise TeacherConfigError(
            "DISTILL.TEACHER.CONFIG_FILE is empty: set it to the teacher's yaml or .py LazyConfig, "
            "or to a detectron2 model-zoo name such as COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
        )
    if name.startswith("d2kd://"):
        from detectron2.utils.file_io import PathManager

        from .model_zoo import ZooFileError

        try:
            return PathManager.get_local_path(name)
        except ZooFileError as e:
            raise TeacherConfigError(f"DISTILL.TEACHER.CONFIG_FILE: {e}") from None
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
            "detectron2 model-zoo config name (e.g. COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml, "
            "or new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py for a LazyConfig). "
            "A relative path written in a yaml is looked up beside that yaml (at any depth of "
            f"_BASE_); one given on the command line, in the working directory {os.getcwd()}"
        ) from None


def _teacher_config_writer(filename: str, path=("TEACHER",)):
    """The ``DISTILL.TEACHER.CONFIG_FILE`` value (``path`` ("TEACHERS", name) for a named
    teacher's) that wins in ``filename`` and its ``_BASE_`` chain, with the directory of the
    yaml that wrote it: ``(value, directory)``, or None.

    Follows fvcore's ``load_yaml_with_base``: a file's own keys override its bases', a list of
    bases is merged in order (a later base overrides an earlier one), and a relative
    ``_BASE_`` is relative to the file that names it.
    """
    import os

    import yaml
    from detectron2.config import CfgNode

    with CfgNode._open_cfg(filename) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.constructor.ConstructorError:  # python tags: merge_from_file loads it unsafe too
            f.seek(0)
            data = yaml.unsafe_load(f)
    data = data or {}
    teacher = data.get("DISTILL") or {}
    for part in path:
        teacher = (teacher.get(part) if isinstance(teacher, dict) else None) or {}
    if "CONFIG_FILE" in teacher:
        return teacher["CONFIG_FILE"], os.path.dirname(os.path.abspath(filename))
    bases = data.get("_BASE_", [])
    for base in reversed(bases if isinstance(bases, list) else [bases]):
        base = os.path.expanduser(base)
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(filename), base)
        found = _teacher_config_writer(base, path)
        if found is not None:
            return found
    return None


def load_config(config_file: str, opts=()):
    """``get_cfg()`` + ``DISTILL`` + the yaml + KEY VALUE overrides, as train_net.py does.

    A relative ``DISTILL.TEACHER.CONFIG_FILE`` written in a yaml is resolved against the
    directory of the yaml that wrote it, at any depth of ``_BASE_`` inheritance (as detectron2
    resolves ``_BASE_``; a file that overrides an inherited value wins, and its own directory
    counts), so configs work from any working directory and can be inherited from anywhere.
    One given in ``opts`` is taken as the user typed it. Model-zoo names are kept as names
    (resolved when the teacher is built).
    """
    import os

    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.merge_from_file(config_file)
    complete_teacher_nodes(cfg)
    nodes = [(("TEACHER",), cfg.DISTILL.TEACHER)]
    nodes += [(("TEACHERS", name), node) for name, node in cfg.DISTILL.TEACHERS.items()]
    for path, node in nodes:
        teacher = node.CONFIG_FILE
        if teacher and not os.path.isabs(teacher):
            writer = _teacher_config_writer(config_file, path)
            if writer is not None and writer[0] == teacher:
                beside = os.path.join(writer[1], teacher)
                if os.path.isfile(beside):
                    node.CONFIG_FILE = resolve_teacher_config_file(beside)
    cfg.merge_from_list(list(opts))
    return cfg


# The name heads use for DISTILL.TEACHER in their TEACHER key ("" means it too).
DEFAULT_TEACHER = "DEFAULT"


def teacher_key(name: str) -> str:
    """The config node of a teacher: "DISTILL.TEACHER" for the default one, else
    "DISTILL.TEACHERS.<name>"."""
    return "DISTILL.TEACHER" if name == DEFAULT_TEACHER else f"DISTILL.TEACHERS.{name}"


def complete_teacher_nodes(cfg) -> None:
    """Give every ``DISTILL.TEACHERS.<NAME>`` node the keys of ``DISTILL.TEACHER`` it omits (their
    defaults), in place, so that ``merge_from_list`` can set them; a key ``DISTILL.TEACHER`` does
    not have, or a node that is not a mapping, is an error naming it."""
    for name, node in cfg.DISTILL.TEACHERS.items():
        _complete_teacher_node(name, node)


def _teacher_defaults():
    from detectron2.config import get_cfg

    return add_distill_config(get_cfg()).DISTILL.TEACHER


def _complete_teacher_node(name: str, node) -> None:
    key = f"DISTILL.TEACHERS.{name}"
    defaults = _teacher_defaults()
    if name.upper() == DEFAULT_TEACHER:
        raise TeacherConfigError(f"{key}: the name {DEFAULT_TEACHER} is DISTILL.TEACHER's; name the teacher otherwise")
    if not isinstance(node, CN):
        raise TeacherConfigError(
            f"{key} = {node!r} is not a teacher node: give it the keys of DISTILL.TEACHER "
            f"({', '.join(defaults)}), e.g. {key}.CONFIG_FILE and {key}.WEIGHTS"
        )
    unknown = sorted(set(node) - set(defaults))
    if unknown:
        raise TeacherConfigError(
            f"{key} has key(s) {', '.join(unknown)} that a teacher does not have; its keys are "
            f"those of DISTILL.TEACHER: {', '.join(defaults)}"
        )
    for k, v in defaults.items():
        if k not in node:
            node[k] = copy.deepcopy(v)


def teacher_nodes(cfg):
    """Teacher name -> its config node: ``DEFAULT_TEACHER`` (``DISTILL.TEACHER``) first, then
    ``DISTILL.TEACHERS`` in name order; a named node's omitted keys read as their defaults
    (the config itself is not changed)."""
    nodes = {DEFAULT_TEACHER: cfg.DISTILL.TEACHER}
    for name in sorted(cfg.DISTILL.get("TEACHERS") or {}):
        node = cfg.DISTILL.TEACHERS[name]
        if isinstance(node, CN):
            node = node.clone()
            node.defrost()
        _complete_teacher_node(name, node)
        nodes[name] = node
    return nodes
