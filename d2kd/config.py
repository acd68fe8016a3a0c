"""The ``cfg.DISTILL`` node: teacher, enabled heads, per-head weights, schedule, prototypes."""
from detectron2.config import CfgNode as CN


def add_distill_config(cfg):
    """Add the ``DISTILL`` node (and ``MODEL.GFL``, see add_gfl_config) to a detectron2 config,
    in place.

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
    # Load .pkl TEACHER.WEIGHTS / MODEL.WEIGHTS from outside detectron2's model zoo (unpickling runs code).
    _C.DISTILL.TEACHER.ALLOW_PICKLE = False

    # Names of registered distillation heads to enable (any number; see DISTILL_HEAD_REGISTRY).
    _C.DISTILL.HEADS = []

    _C.DISTILL.SCHEDULE = CN()
    # Iterations of plain student training before any distillation loss is applied.
    _C.DISTILL.SCHEDULE.START_ITER = 0
    # Multiply the decaying terms of every head that enables DECAY by (1 - iter / MAX_ITER).
    _C.DISTILL.SCHEDULE.LINEAR_DECAY = False

    # FitNet: lambda * mean((A(F_s) - F_t)^2) over whole FPN maps (docs/METHODS.md section 5).
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

    # Global Knowledge distillation (GK's RDM, docs/METHODS.md section 1.4-1.5).
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
    # Global term (Eq. 6): "cosine" (smooth-L1 element mean of the robust-weighted rows of
    # instance-to-prototype cosines, the authors' code) or "projection" (the paper's text: Eq. 5's
    # coefficients with DISTILL.PROTOTYPES.ALPHA, summed over prototypes, divided by the instances).
    _C.DISTILL.GK.GLOBAL_FORM = "cosine"
    # Robust weights (Eq. 8) on the mask, the response rows and the global term; False: all 1.
    _C.DISTILL.GK.ROBUST_WEIGHTS = True

    # PKD: 1/2 mean((S^ - T^)^2) of per-channel standardised FPN maps (docs/METHODS.md section 2).
    _C.DISTILL.PKD = CN()
    # Loss weight; -1 picks the released one by the student's kind: 6 two-stage, 10 dense.
    _C.DISTILL.PKD.WEIGHT = -1.0
    # Strides to distil; empty means the NUM_LEVELS finest strides both models have.
    _C.DISTILL.PKD.STRIDES = []
    # With STRIDES empty: how many shared strides, finest first (released: 4); 0 means all.
    _C.DISTILL.PKD.NUM_LEVELS = 4
    # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the released configs do not decay).
    _C.DISTILL.PKD.DECAY = False

    # FGFI: feature imitation on the cells of near-object anchors (docs/METHODS.md section 5).
    _C.DISTILL.FGFI = CN()
    # lambda of lambda / (2 sum(I)) * sum(I (A(F_s) - F_t)^2) (a sum over channels, as the paper).
    _C.DISTILL.FGFI.WEIGHT = 0.01
    # psi: an anchor is near a GT when its IoU exceeds psi times that GT's best anchor IoU.
    _C.DISTILL.FGFI.THRESHOLD = 0.5
    # What psi's "best anchor IoU" of a GT is taken over: "all_levels" (every anchor, the paper's
    # rule read literally), "each_level" (per level), "assigned_level" (the DeFeat/GK code base).
    _C.DISTILL.FGFI.MAX_IOU_OVER = "all_levels"
    # Iterations at the start of training without the FGFI term (the paper: 400).
    _C.DISTILL.FGFI.START_ITER = 400
    _C.DISTILL.FGFI.STRIDES = []
    # Student-side adapter, always present (the paper: 3x3 conv + ReLU).
    _C.DISTILL.FGFI.ADAPTER_KERNEL = 3
    _C.DISTILL.FGFI.ADAPTER_RELU = True
    # Adapter init: "msra" (d2kd's adapters) or "trunc_normal" (FGFI's code: std 1e-4, within 2 std).
    _C.DISTILL.FGFI.ADAPTER_INIT = "msra"
    _C.DISTILL.FGFI.DECAY = False

    # DeFeat: decoupled fg / bg feature imitation plus fg / bg RoI KL (docs/METHODS.md section 5).
    _C.DISTILL.DEFEAT = CN()
    # Feature terms (GK's fg / bg normalisation, levels averaged); DeFeat's VOC config: 3 / 12.
    _C.DISTILL.DEFEAT.FG_WEIGHT = 3.0
    _C.DISTILL.DEFEAT.BG_WEIGHT = 12.0
    # RoI-head KL over foreground and over background RoIs, each a mean over its own RoIs
    # (two-stage students only; 0 for both lets a dense teacher teach a two-stage student).
    _C.DISTILL.DEFEAT.KL_FG_WEIGHT = 2.0
    _C.DISTILL.DEFEAT.KL_BG_WEIGHT = 2.0
    _C.DISTILL.DEFEAT.TEMPERATURE = 1.0
    _C.DISTILL.DEFEAT.STRIDES = []
    # Student-side adapter, always present (DeFeat's code: 3x3 conv, no ReLU).
    _C.DISTILL.DEFEAT.ADAPTER_KERNEL = 3
    _C.DISTILL.DEFEAT.ADAPTER_RELU = False
    # Weight the foreground cells by the GT boxes' GK robust weights (GK paper, Table 4).
    _C.DISTILL.DEFEAT.ROBUST_WEIGHTS = False
    # Follow DISTILL.SCHEDULE.LINEAR_DECAY (feature terms only, as GK's).
    _C.DISTILL.DEFEAT.DECAY = False

    # RKD: distance and angle relations among the GT instance embeddings at each level.
    _C.DISTILL.RKD = CN()
    _C.DISTILL.RKD.DISTANCE_WEIGHT = 25.0
    _C.DISTILL.RKD.ANGLE_WEIGHT = 50.0
    # L2-normalise the instance embeddings before relating them (mmrazor's RKD default).
    _C.DISTILL.RKD.L2_NORM = True
    # Replace the instance relations by GK's robust-weighted instance-to-prototype rows
    # (GK paper, Table 4); needs the prototypes of DISTILL.PROTOTYPES.
    _C.DISTILL.RKD.GLOBAL = False
    _C.DISTILL.RKD.GLOBAL_WEIGHT = 1.0
    _C.DISTILL.RKD.STRIDES = []
    _C.DISTILL.RKD.DECAY = False

    # Rank Mimicking (docs/METHODS.md section 4): per GT box, KL(teacher || student) of the softmax
    # over its positive anchors of their scores for its class (dense students).
    _C.DISTILL.RANK_MIMIC = CN()
    _C.DISTILL.RANK_MIMIC.WEIGHT = 4.0
    # Scores softmaxed over the candidates: "sigmoid" (class probabilities) or "logits".
    _C.DISTILL.RANK_MIMIC.SCORES = "sigmoid"
    # T of softmax(score / T) over the candidates (the spec: 1); < 1 sharpens sigmoid scores.
    _C.DISTILL.RANK_MIMIC.TEMPERATURE = 1.0
    _C.DISTILL.RANK_MIMIC.DECAY = False

    # Prediction-guided Feature Imitation (docs/METHODS.md section 4): feature imitation per cell
    # weighted by the detached squared class-prediction difference (dense students).
    _C.DISTILL.PFI = CN()
    _C.DISTILL.PFI.WEIGHT = 1.5
    # Predictions compared: "sigmoid" (class probabilities) or "logits".
    _C.DISTILL.PFI.SCORES = "sigmoid"
    _C.DISTILL.PFI.STRIDES = []
    # Student-side adapter A: "always" or "auto" (only when channels differ).
    _C.DISTILL.PFI.ADAPTER = "always"
    _C.DISTILL.PFI.ADAPTER_KERNEL = 1
    _C.DISTILL.PFI.ADAPTER_RELU = False
    _C.DISTILL.PFI.DECAY = False

    # Localization Distillation (docs/METHODS.md section 3) for GFL students and teachers: edge-
    # distribution KL on the main region and the valuable localisation region, class KD.
    _C.DISTILL.LD = CN()
    # Main region (the student's positive anchors), weighted by the student's max class score.
    _C.DISTILL.LD.WEIGHT = 0.25
    # Valuable localisation region: 0.25 t_g <= DIoU(anchor, g) < t_g, weighted by the IoU.
    _C.DISTILL.LD.VLR_WEIGHT = 0.25
    _C.DISTILL.LD.VLR_LOWER = 0.25
    # Temperature of the edge-distribution KL.
    _C.DISTILL.LD.TEMPERATURE = 10.0
    # Class KD (softmax over classes) on the main region's anchors; 0 turns it off.
    _C.DISTILL.LD.KD_WEIGHT = 10.0
    _C.DISTILL.LD.KD_TEMPERATURE = 2.0
    # ATSS candidates per level for t_g (mean + std of their IoUs).
    _C.DISTILL.LD.TOPK = 9
    _C.DISTILL.LD.DECAY = False
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
    relative to the working directory), a detectron2 model-zoo config name.
    """
    import os

    if not name:
        raise TeacherConfigError(
            "DISTILL.TEACHER.CONFIG_FILE is empty: set it to the teacher's yaml, or to a "
            "detectron2 model-zoo name such as COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
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
            "detectron2 model-zoo config name (e.g. COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml). "
            "A relative path written in a yaml is looked up beside that yaml (at any depth of "
            f"_BASE_); one given on the command line, in the working directory {os.getcwd()}"
        ) from None


def _teacher_config_writer(filename: str):
    """The ``DISTILL.TEACHER.CONFIG_FILE`` value that wins in ``filename`` and its ``_BASE_``
    chain, with the directory of the yaml that wrote it: ``(value, directory)``, or None.

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
    teacher = (data.get("DISTILL") or {}).get("TEACHER") or {}
    if "CONFIG_FILE" in teacher:
        return teacher["CONFIG_FILE"], os.path.dirname(os.path.abspath(filename))
    bases = data.get("_BASE_", [])
    for base in reversed(bases if isinstance(bases, list) else [bases]):
        base = os.path.expanduser(base)
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(filename), base)
        found = _teacher_config_writer(base)
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
    teacher = cfg.DISTILL.TEACHER.CONFIG_FILE
    if teacher and not os.path.isabs(teacher):
        writer = _teacher_config_writer(config_file)
        if writer is not None and writer[0] == teacher:
            beside = os.path.join(writer[1], teacher)
            if os.path.isfile(beside):
                cfg.DISTILL.TEACHER.CONFIG_FILE = resolve_teacher_config_file(beside)
    cfg.merge_from_list(list(opts))
    return cfg
