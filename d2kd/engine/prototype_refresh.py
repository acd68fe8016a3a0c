"""Building and refreshing the prototype bank during training (docs/METHODS.md section 1.3)."""
import logging
import time
from collections import defaultdict
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from detectron2.data import DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.engine import HookBase
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_every_n_seconds
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..config import DEFAULT_TEACHER
from ..data.epochs import epochs_to_iterations, iterations_per_epoch, training_dataset
from ..structures import by_stride
from ..prototypes.instance_features import instance_features
from ..prototypes.selection import DEFAULT_CACHE_BYTES, select_prototypes

logger = logging.getLogger(__name__)

# {stride: {class: (student (n, D_s), teacher (n, D_t), source (n, 5))}}; a source row is
# (dataset index, x1, y1, x2, y2) with the box in the original image's pixels.
InstanceFeatureSets = Dict[int, Dict[int, Tuple[Tensor, Tensor, Tensor]]]

# {dataset index: {stride: (m, D_t) teacher instance features of the image's kept boxes}}
TeacherFeatureCache = Dict[int, Dict[int, Tensor]]


# A build logs progress lines only once it has run this long: a quick one logs its summary alone.
PROGRESS_AFTER_S = 10.0


def _progress(done: int, total: int, start: float, what: str, unit: str = "images") -> None:
    """A progress line with ETA every 10 s (as detectron2's evaluators log), from
    ``PROGRESS_AFTER_S`` on."""
    if total <= 0 or done <= 0:
        return
    elapsed = time.perf_counter() - start
    if elapsed < PROGRESS_AFTER_S:
        return
    eta = elapsed / done * (total - done)
    log_every_n_seconds(
        logging.INFO,
        f"{what}: {done}/{total} {unit}, {elapsed:.0f} s elapsed, ETA {eta:.0f} s",
        n=10, name=__name__,
    )


@torch.no_grad()
def collect_instance_features(model, batches: Iterable[List[dict]], min_size: float,
                              teacher_cache: TeacherFeatureCache = None,
                              total_images: int = 0, timings: Optional[Dict[str, float]] = None,
                              teacher: str = DEFAULT_TEACHER) -> InstanceFeatureSets:
    """Student and teacher instance features of every GT box wider and higher than
    ``min_size`` original-image pixels, at every stride of ``model.prototype_bank``, grouped
    by stride and class, on the CPU.

    Inputs may carry ``"d2kd_index"`` (their index in the sampled dataset list); it is kept,
    with each box in original-image pixels, as the instance's source (-1 when absent). Inputs
    may carry ``"d2kd_classes"``, the classes the image was sampled for: boxes of other
    classes in it are skipped (each class uses only its own image subset).

    ``teacher_cache`` (optional, filled in place): the teacher is frozen, so its instance
    features of an image (indexed by ``"d2kd_index"``) are computed once and kept; a batch
    whose images are all in the cache skips the teacher's backbone. The cache is valid only
    for the same images in the same batches (the padding of a batch reaches the features).
    ``total_images`` (optional) enables a progress line with ETA. ``timings`` (optional, added
    to in place): seconds spent getting the batches ("images": reading and resizing), in the
    student's and the teacher's forward ("student", "teacher") and pooling ("pooling").

    The model is switched to eval mode meanwhile (the student's BatchNorm statistics must not
    move) and restored afterwards. ``teacher``: whose bank and features (a name of
    ``DISTILL.TEACHERS``; by default ``DISTILL.TEACHER``'s).
    """
    bank = model.prototype_banks()[teacher] if hasattr(model, "prototype_banks") else model.prototype_bank
    teacher_model = model.teacher_slots()[teacher].module if hasattr(model, "teacher_slots") else model.teacher
    was_training = model.training
    model.eval()
    found: Dict[int, Dict[int, List[Tuple[Tensor, ...]]]] = defaultdict(lambda: defaultdict(list))
    start, done = time.perf_counter(), 0
    clock = _PhaseClock(timings, model.device)
    batches = iter(batches)
    try:
        while True:
            batch = next(batches, None)
            clock.lap("images")
            if batch is None:
                break
            images = model.preprocess_image(batch)
            student = by_stride(model.backbone, model.backbone(images.tensor))
            clock.lap("student")
            keys = [x.get("d2kd_index", -1) for x in batch]
            cached = teacher_cache is not None and all(k >= 0 and k in teacher_cache for k in keys)
            t_feats = None if cached else by_stride(
                teacher_model.backbone,
                model.teacher_backbone(batch) if teacher == DEFAULT_TEACHER else model.teacher_backbone(batch, teacher))
            clock.lap("teacher")
            boxes, classes, index, sources = [], [], [], []
            for i, x in enumerate(batch):
                inst = x["instances"].to(model.device)
                scale = x.get("width", x["image"].shape[-1]) / x["image"].shape[-1]
                original = inst.gt_boxes.tensor * scale
                keep = ((original[:, 2:] - original[:, :2]) > min_size).all(dim=1)
                if "d2kd_classes" in x:
                    wanted = torch.as_tensor(sorted(x["d2kd_classes"]), dtype=torch.long, device=model.device)
                    keep &= torch.isin(inst.gt_classes, wanted)
                boxes.append(inst.gt_boxes.tensor[keep])
                classes.append(inst.gt_classes[keep])
                index.append(torch.full((int(keep.sum()),), i, dtype=torch.long, device=model.device))
                src = torch.full((int(keep.sum()), 5), float(x.get("d2kd_index", -1)))
                src[:, 1:] = original[keep].cpu()
                sources.append(src)
            counts = [len(b) for b in boxes]
            boxes, classes, index, sources = torch.cat(boxes), torch.cat(classes), torch.cat(index), torch.cat(sources)
            done += len(batch)
            _progress(done, total_images, start, "Prototype build: instance features")
            if len(boxes) == 0:
                continue
            classes_cpu = classes.cpu()
            for s in bank.strides:
                f_s = instance_features(student[s], boxes, index, s).float().cpu()
                if cached:
                    f_t = torch.cat([teacher_cache[k][s] for k in keys])
                else:
                    f_t = instance_features(t_feats[s], boxes, index, s).float().cpu()
                    if teacher_cache is not None:
                        for k, part in zip(keys, torch.split(f_t, counts)):
                            if k >= 0:
                                teacher_cache.setdefault(k, {})[s] = part.clone()
                for c in classes_cpu.unique().tolist():
                    sel = classes_cpu == c
                    found[s][c].append((f_s[sel], f_t[sel], sources[sel]))
            clock.lap("pooling")
    finally:
        model.train(was_training)
    return _concat(found)


class _PhaseClock:
    """Adds the seconds since the last lap to ``timings[phase]`` (nothing when timings is
    None); on CUDA it synchronises first, so a phase's kernels count in that phase."""

    def __init__(self, timings: Optional[Dict[str, float]], device):
        self.timings, self.device = timings, torch.device(device)
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now


def _concat(found) -> InstanceFeatureSets:
    return {
        s: {c: tuple(torch.cat(column) for column in zip(*parts)) for c, parts in per_class.items()}
        for s, per_class in found.items()
    }


def merge_feature_sets(sets: List[InstanceFeatureSets]) -> InstanceFeatureSets:
    """Concatenate per-rank feature sets in rank order (so every rank merges identically)."""
    merged: Dict[int, Dict[int, List[Tuple[Tensor, ...]]]] = defaultdict(lambda: defaultdict(list))
    for one in sets:
        for s, per_class in one.items():
            for c, columns in per_class.items():
                merged[s][c].append(columns)
    return _concat(merged)


def annotated_test_mapper(cfg) -> DatasetMapper:
    """Maps dataset dicts as at test time (test-size resize, no flip) but keeps the GT boxes."""
    return DatasetMapper(
        is_train=True,  # keeps the annotations; the only augmentation is the test-time resize
        augmentations=[T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)],
        image_format=cfg.INPUT.FORMAT,
    )


def prototype_source_dataset(names) -> List[dict]:
    """The list that prototype sources index into: ``DATASETS.TRAIN``, images with boxes."""
    return get_detection_dataset_dicts(names, filter_empty=True)


def usable_instances(record: dict, min_size: float) -> List[int]:
    """The class of every box of a dataset record that prototypes can be built from: not a
    crowd, wider and higher than ``min_size`` original-image pixels (one entry per box)."""
    classes = []
    for ann in record.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
        if x1 - x0 > min_size and y1 - y0 > min_size:
            classes.append(int(ann["category_id"]))
    return classes


def per_class_image_subsets(dataset: List[dict], max_images: int, min_size: float, seed: int) -> Dict[int, np.ndarray]:
    """The images each class builds its prototypes from, as the GK authors choose them.

    For every class, up to ``max_images`` images that hold at least one non-crowd box of it
    wider and higher than ``min_size`` original-image pixels, drawn at random with a
    generator seeded by ``(seed, class)``: the same subset on every rank, after a resume and
    at every refresh, and a rare class gets its images however few there are.

    Returns:
        dict[int, ndarray]: class -> ascending indices into ``dataset``.
    """
    holders: Dict[int, List[int]] = defaultdict(list)
    for i, record in enumerate(dataset):
        for c in set(usable_instances(record, min_size)):
            holders[c].append(i)
    subsets = {}
    for c in sorted(holders):
        images = np.asarray(holders[c])
        rng = np.random.default_rng([max(int(seed), 0), c])
        subsets[c] = np.sort(rng.permutation(images)[:max_images])
    return subsets


def images_and_classes(subsets: Dict[int, np.ndarray]) -> List[Tuple[int, List[int]]]:
    """The union of the per-class subsets: (image index, classes it was drawn for), ascending."""
    drawn: Dict[int, List[int]] = defaultdict(list)
    for c, images in subsets.items():
        for i in images.tolist():
            drawn[i].append(c)
    return [(i, sorted(drawn[i])) for i in sorted(drawn)]


def _class_name(c: int, class_names) -> str:
    return f"{c} ({class_names[c]})" if class_names and c < len(class_names) else str(c)


def check_finite_features(stride: int, cls: int, f_s: Tensor, f_t: Tensor, iteration=None, class_names=None) -> None:
    """Raise FloatingPointError naming the model, stride, class and iteration when an
    instance feature is NaN or infinite (a build on such features would select garbage)."""
    at = f"at iteration {iteration}" if iteration is not None else "in this build"
    for side, f in (("student", f_s), ("teacher", f_t)):
        if torch.isfinite(f).all():
            continue
        bad = int((~torch.isfinite(f)).any(dim=1).sum()) if f.dim() == 2 else -1
        where = (f"the {side}'s instance features of class {_class_name(cls, class_names)} at stride "
                 f"{stride} are not finite (NaN/inf; {bad} of {len(f)} instances) in the prototype build {at}")
        if side == "student":
            raise FloatingPointError(
                f"{where}: training diverged before this build. Lower SOLVER.BASE_LR, enable "
                "SOLVER.CLIP_GRADIENTS, or resume from an earlier checkpoint"
            )
        raise FloatingPointError(
            f"{where}: the teacher is frozen, so its weights (DISTILL.TEACHER.WEIGHTS) diverged "
            "when it was trained, or the input images hold NaN/inf"
        )


def selection_cost(n: int, d_s: int, d_t: int) -> float:
    """Estimated work of one PGM selection (its N x N density filter dominates)."""
    return float(n) * n * (d_s + d_t)


def assign_selections(features: InstanceFeatureSets, world_size: int) -> List[List[Tuple[int, int]]]:
    """Split the (stride, class) selections among ``world_size`` ranks, balancing their
    estimated cost (largest first, each to the least loaded rank; ties to the lowest rank).
    Deterministic: every rank computes the same split from the same (gathered) features."""
    items = []
    for s, per_class in features.items():
        for c, (f_s, f_t, _) in per_class.items():
            items.append((selection_cost(len(f_s), f_s.shape[1], f_t.shape[1]), s, c))
    items.sort(key=lambda x: (-x[0], x[1], x[2]))
    load = [0.0] * world_size
    shares: List[List[Tuple[int, int]]] = [[] for _ in range(world_size)]
    for cost, s, c in items:
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += cost
        shares[r].append((s, c))
    return shares


def select_share(features: InstanceFeatureSets, share: List[Tuple[int, int]], num_prototypes: int,
                 alpha: float, device=None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 progress: bool = False) -> Dict[Tuple[int, int], Tensor]:
    """Run PGM on the given (stride, class) selections: {(stride, class): chosen indices (CPU)}.
    ``progress``: log progress lines with ETA (for a long build)."""
    chosen, start = {}, time.perf_counter()
    for i, (s, c) in enumerate(share):
        f_s, f_t, _ = features[s][c]
        if device is not None:
            f_s, f_t = f_s.to(device), f_t.to(device)
        chosen[(s, c)] = select_prototypes(f_s, f_t, num_prototypes, alpha=alpha, cache_bytes=cache_bytes).cpu()
        if progress:
            _progress(i + 1, len(share), start, "Prototype build: selection", "(class, stride) pairs on this rank")
    return chosen


def rebuild_bank(bank, features: InstanceFeatureSets, alpha: float, device=None, iteration=None,
                 class_names=None, cache_bytes: int = DEFAULT_CACHE_BYTES, rank: int = 0,
                 world_size: int = 1, gather=None) -> None:
    """Select K prototypes per (stride, class) and write them into ``bank``.

    With ``world_size`` > 1 the selections are split among the ranks
    (:func:`assign_selections`); each rank selects its share and ``gather`` (an all_gather
    of a picklable object, e.g. ``detectron2.utils.comm.all_gather``) collects the chosen
    indices, which every rank writes into its bank from the same (gathered) ``features``:
    all ranks end with the identical bank.

    Classes without instances get no prototypes (all slots invalid). Non-finite features
    raise FloatingPointError naming model, stride, class and ``iteration``.
    """
    for s in bank.strides:  # all of them first: a diverged model leaves the bank untouched
        for c, (f_s, f_t, _) in sorted(features.get(s, {}).items()):
            check_finite_features(s, c, f_s, f_t, iteration, class_names)
    wanted = {s: per_class for s, per_class in features.items() if s in bank.strides}
    shares = assign_selections(wanted, world_size)
    chosen = select_share(wanted, shares[rank], bank.num_prototypes, alpha, device, cache_bytes, progress=True)
    if world_size > 1:
        merged = {}
        for part in gather(chosen):
            merged.update(part)
        chosen = merged
    for s in bank.strides:
        per_class = features.get(s, {})
        for c in range(bank.num_classes):
            if c not in per_class:
                bank.set_class(s, c, bank.student(s)[c, :0], bank.teacher(s)[c, :0])
                continue
            f_s, f_t, source = per_class[c]
            picks = chosen[(s, c)]
            bank.set_class(s, c, f_s[picks], f_t[picks], source[picks])
    bank.num_builds += 1
    bank.rebuild_reason = ""


def build_report(bank, features: InstanceFeatureSets, num_images, elapsed: float, iteration: int,
                 min_size: float, class_names=None, phases: Optional[Dict[str, float]] = None
                 ) -> Tuple[str, List[str]]:
    """The log line of a build (images, instances and prototypes per class and stride, time,
    and ``phases``: seconds per phase) and the warnings for classes and strides left without
    prototypes. ``num_images``: the number of images, or a phrase saying where the features
    came from."""
    if isinstance(num_images, int):
        num_images = f"{num_images} images"
    from tabulate import tabulate

    rows = []
    for c in range(bank.num_classes):
        row = [_class_name(c, class_names)]
        for s in bank.strides:
            per_class = features.get(s, {})
            n = len(per_class[c][0]) if c in per_class else 0
            row.append(f"{n} -> {int(bank.prototypes_per_class(s)[c])}")
        rows.append(row)
    instances = max((sum(len(f[0]) for f in features.get(s, {}).values()) for s in bank.strides), default=0)
    table = tabulate(rows, headers=["class"] + [f"stride {s}: instances -> prototypes" for s in bank.strides],
                     tablefmt="pipe")
    message = (f"Prototype build at iteration {iteration}: {num_images}, {instances} instances, "
               f"{elapsed:.2f}s ({''.join(f'{k} {v:.2f}s, ' for k, v in (phases or {}).items())}"
               f"counted as hook time)\n{table}")
    warnings = []
    counts = torch.stack([bank.prototypes_per_class(s) for s in bank.strides])  # (S, C)
    empty_classes = [c for c in range(bank.num_classes) if int(counts[:, c].sum()) == 0]
    empty_strides = [s for i, s in enumerate(bank.strides) if int(counts[i].sum()) == 0]
    hint = (f"A class needs at least 2 distinct instances wider and higher than "
            f"DISTILL.PROTOTYPES.MIN_SIZE={min_size:g} original-image pixels among its "
            "DISTILL.PROTOTYPES.MAX_IMAGES images of DATASETS.TRAIN; lower MIN_SIZE or check the "
            "annotations")
    if len(empty_classes) == bank.num_classes:
        warnings.append(
            f"THE PROTOTYPE BANK BUILT AT ITERATION {iteration} IS EMPTY: no class has a prototype "
            f"({instances} instances found in {num_images}). GK's global term is 0 and every "
            f"robust weight is 1 until the next build. {hint}"
        )
    else:
        if empty_classes:
            names = ", ".join(_class_name(c, class_names) for c in empty_classes)
            warnings.append(
                f"The prototype build at iteration {iteration} left {len(empty_classes)} of "
                f"{bank.num_classes} classes without any prototype: {names}. They get no global "
                f"term and robust weight 1. {hint}"
            )
        if empty_strides:
            warnings.append(
                f"The prototype build at iteration {iteration} left stride(s) {empty_strides} without "
                "any prototype: nothing is distilled globally there. Check DISTILL.PROTOTYPES.STRIDES "
                "and the features at those strides"
            )
    return message, warnings


def online_feature_sets(store) -> InstanceFeatureSets:
    """The online store's instances as a build's feature sets. The sources' first column is
    the dataset index for the paper's refresh; a training batch does not carry it, so it is
    -1 (unknown) here, with the box kept."""
    sets = store.feature_sets()
    for per_class in sets.values():
        for _, _, source in per_class.values():
            source[:, 0] = -1.0
    return sets


def _thing_classes(dataset_names):
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    return None


class PrototypeSchedule(NamedTuple):
    """When the prototype bank is built: see :func:`prototype_schedule`."""
    start_iter: int
    period: int
    builds: int  # builds in iterations [0, SOLVER.MAX_ITER) of a run from scratch
    message: str
    warnings: List[str]


def schedule_in_epochs(cfg) -> bool:
    """Whether ``DISTILL.PROTOTYPES`` gives its schedule (or part of it) in epochs."""
    node = cfg.DISTILL.PROTOTYPES
    return node.START_EPOCHS > 0 or node.PERIOD_EPOCHS > 0


def prototype_schedule(cfg, num_images: Optional[int] = None) -> PrototypeSchedule:
    """The first build's iteration and the rebuild period, in iterations, with the log line
    that says where they come from.

    ``DISTILL.PROTOTYPES.START_EPOCHS`` / ``PERIOD_EPOCHS``, when > 0, replace ``START_ITER`` /
    ``PERIOD`` (so a config inheriting iterations can switch to epochs): an epoch is
    ``num_images`` (the training set after detectron2's filtering,
    :func:`d2kd.data.epochs.training_dataset`; needed only then) over ``SOLVER.IMS_PER_BATCH``,
    rounded up to whole iterations.
    """
    node = cfg.DISTILL.PROTOTYPES
    for key in ("START_ITER", "PERIOD", "START_EPOCHS", "PERIOD_EPOCHS"):
        if node[key] < 0:
            raise ValueError(
                f"DISTILL.PROTOTYPES.{key} = {node[key]} is negative: use 0 (START_*: build at the "
                "first step; PERIOD*: never rebuild) or a positive number"
            )
    batch = cfg.SOLVER.IMS_PER_BATCH
    if schedule_in_epochs(cfg) and num_images is None:
        raise ValueError("a schedule in epochs needs the training set's size (num_images)")

    def resolve(iter_key, epoch_key):
        epochs = node[epoch_key]
        if epochs > 0:
            note = f"DISTILL.PROTOTYPES.{epoch_key} {epochs:g}"
            if node[iter_key]:
                note += f", which replaces {iter_key} {node[iter_key]}"
            return epochs_to_iterations(epochs, num_images, batch), note
        return int(node[iter_key]), f"DISTILL.PROTOTYPES.{iter_key}"

    start, start_note = resolve("START_ITER", "START_EPOCHS")
    period, period_note = resolve("PERIOD", "PERIOD_EPOCHS")
    max_iter = cfg.SOLVER.MAX_ITER
    builds = 0 if start >= max_iter else 1 + ((max_iter - 1 - start) // period if period > 0 else 0)
    rebuild = f"rebuilt every {period} iterations ({period_note})" if period > 0 else f"never rebuilt ({period_note} 0)"
    message = f"Prototype bank: first build at iteration {start} ({start_note}), {rebuild}"
    if num_images is not None:
        message += (f"; an epoch is {iterations_per_epoch(num_images, batch):g} iterations ({num_images} images "
                    f"of DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} at SOLVER.IMS_PER_BATCH {batch})")
    message += f"; {builds} build(s) in SOLVER.MAX_ITER {max_iter}"
    warnings = []
    if builds == 0:
        warnings.append(
            f"The prototype bank's first build (iteration {start}, {start_note}) is not before "
            f"SOLVER.MAX_ITER {max_iter}: the bank is never built, GK's global term stays 0 and every "
            "robust weight 1. Lower DISTILL.PROTOTYPES.START_ITER / START_EPOCHS"
        )
    return PrototypeSchedule(start, period, builds, message, warnings)


class PrototypeRefreshHook(HookBase):
    """Builds the prototype bank at ``DISTILL.PROTOTYPES.START_ITER`` and every ``PERIOD``
    iterations after it, or ``START_EPOCHS`` / ``PERIOD_EPOCHS`` epochs (see
    :func:`prototype_schedule`, logged when the hook is made), and at the first step after a
    resume that finds no bank.

    The images are up to ``MAX_IMAGES`` per class, drawn once from ``SEED`` (see
    :func:`per_class_image_subsets`) and kept for the whole run. Each rank extracts instance
    features from its share of them; the teacher's are computed at the first build and kept
    (in CPU memory: the teacher is frozen and the images fixed), only the student's are
    extracted again, from the read images kept across builds (``IMAGE_CACHE_BYTES``). The
    features are gathered, the (class, stride) selections split among the ranks and their
    results gathered, so all ranks write identical prototypes.

    With ``DISTILL.PROTOTYPES.SOURCE "online"`` a build selects from the bank's
    :class:`~d2kd.prototypes.online_store.OnlineInstanceStore` (filled by the training steps,
    the same on every rank) and extracts nothing; only while the store is empty does it read
    the images as above.

    Each build is logged (images or store, instances and prototypes per class and stride,
    time and its phases), with a
    warning for classes or strides left without prototypes. The trainer puts this hook before
    detectron2's IterationTimer, so a build counts as hook time, not iteration time.
    """

    def __init__(self, cfg):
        node = cfg.DISTILL.PROTOTYPES
        self._dataset = None
        num_images = None
        if schedule_in_epochs(cfg):
            train = training_dataset(cfg)
            num_images = len(train)
            if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and not cfg.MODEL.KEYPOINT_ON:
                self._dataset = train  # the very list prototype_source_dataset would load again
        schedule = prototype_schedule(cfg, num_images)
        self.start_iter, self.period = schedule.start_iter, schedule.period
        logger.info(schedule.message)
        for w in schedule.warnings:
            logger.warning(w)
        self.max_images = node.MAX_IMAGES
        self.min_size = node.MIN_SIZE
        self.alpha = node.ALPHA
        self.cache_bytes = int(node.CACHE_BYTES)
        # per teacher (each prototype bank is one teacher's): its kept features and their key
        self._teacher_caches: Dict[str, TeacherFeatureCache] = {}
        self._teacher_cache_keys: Dict[str, tuple] = {}
        # mapped (read, resized) images kept across builds, up to IMAGE_CACHE_BYTES
        self._mapped: Dict[int, dict] = {}
        self._mapped_bytes = 0
        self.image_cache_bytes = int(node.get("IMAGE_CACHE_BYTES", 0))
        self.timings: Dict[str, float] = {}  # the last build's seconds per phase
        self.batch_size = max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
        self.seed = cfg.SEED
        self._dataset_names = cfg.DATASETS.TRAIN
        self._class_names = _thing_classes(cfg.DATASETS.TRAIN)
        self._images = None
        self._mapper = annotated_test_mapper(cfg)

    def _model(self):
        model = self.trainer.model
        return model.module if isinstance(model, DistributedDataParallel) else model

    def _banks(self):
        """Teacher name -> its pair's prototype bank (one per teacher a prototype head reads)."""
        model = self._model()
        if hasattr(model, "prototype_banks"):
            return model.prototype_banks()
        return {DEFAULT_TEACHER: model.prototype_bank}

    def is_due(self, iteration: int) -> bool:
        if iteration < self.start_iter:
            return False
        if not all(bank.is_built for bank in self._banks().values()):
            return True
        return self.period > 0 and (iteration - self.start_iter) % self.period == 0 and iteration > self.start_iter

    def before_step(self):
        if self.is_due(self.trainer.iter):
            self.refresh(self.trainer.iter)

    def images(self) -> List[Tuple[int, List[int]]]:
        """(dataset index, classes drawn for) of every image the prototypes are built from."""
        if self._images is None:
            if self._dataset is None:
                self._dataset = prototype_source_dataset(self._dataset_names)
            subsets = per_class_image_subsets(self._dataset, self.max_images, self.min_size, self.seed)
            self._images = images_and_classes(subsets)
        return self._images

    def _map(self, j: int) -> dict:
        if j in self._mapped:  # the test-time mapping has no randomness: the same every build
            return self._mapped[j]
        record = self._dataset[j]
        try:
            mapped = self._mapper(record)
        except OSError as e:  # a missing or unreadable image: name it and its dataset
            raise FileNotFoundError(
                f"the prototype build cannot read image {record.get('file_name')!r} (entry {j} of "
                f"DATASETS.TRAIN {tuple(self._dataset_names)}): {e}"
            ) from e
        size = mapped["image"].numel() * mapped["image"].element_size()
        if self._mapped_bytes + size <= self.image_cache_bytes:
            self._mapped[j] = mapped
            self._mapped_bytes += size
        return mapped

    def _batches(self, mine: List[Tuple[int, List[int]]]):
        """Mapped batches of ``mine`` (this rank's share of :meth:`images`)."""
        for i in range(0, len(mine), self.batch_size):
            yield [
                dict(self._map(j), d2kd_index=int(j), d2kd_classes=classes)
                for j, classes in mine[i: i + self.batch_size]
            ]

    def _image_features(self, model, teacher: str = DEFAULT_TEACHER) -> InstanceFeatureSets:
        """The paper's refresh: this rank extracts its share of :meth:`images`; gathered."""
        bank = self._banks()[teacher]
        mine = self.images()[comm.get_rank():: comm.get_world_size()]
        key = (tuple(j for j, _ in mine), self.batch_size, tuple(bank.strides))
        if key != self._teacher_cache_keys.get(teacher):  # other images or batches: the kept features are void
            self._teacher_caches[teacher], self._teacher_cache_keys[teacher] = {}, key
        extra = {} if teacher == DEFAULT_TEACHER else {"teacher": teacher}
        local = collect_instance_features(model, self._batches(mine), self.min_size,
                                          teacher_cache=self._teacher_caches[teacher], total_images=len(mine),
                                          timings=self.timings, **extra)
        return merge_feature_sets(comm.all_gather(local))

    @property
    def _teacher_cache(self) -> TeacherFeatureCache:
        """The default teacher's kept instance features (and below, their key)."""
        return self._teacher_caches.setdefault(DEFAULT_TEACHER, {})

    @_teacher_cache.setter
    def _teacher_cache(self, value: TeacherFeatureCache) -> None:
        self._teacher_caches[DEFAULT_TEACHER] = value

    @property
    def _teacher_cache_key(self):
        return self._teacher_cache_keys.get(DEFAULT_TEACHER)

    @_teacher_cache_key.setter
    def _teacher_cache_key(self, value) -> None:
        self._teacher_cache_keys[DEFAULT_TEACHER] = value

    def refresh(self, iteration: int) -> None:
        """Build every prototype bank (one per teacher a prototype head reads)."""
        for teacher in self._banks():
            self._refresh_bank(iteration, teacher)

    def _refresh_bank(self, iteration: int, teacher: str) -> None:
        start = time.perf_counter()
        self.timings = {}
        model = self._model()
        bank = self._banks()[teacher]
        # a named teacher's build says whose it is; its scalars carry the name
        whose = "" if teacher == DEFAULT_TEACHER else f" (teacher DISTILL.TEACHERS.{teacher})"
        suffix = "" if teacher == DEFAULT_TEACHER else f"_{teacher}"
        if bank.rebuild_reason:
            logger.warning(f"Rebuilding the prototype bank at iteration {iteration}: {bank.rebuild_reason}")
        store = bank.store
        if store is not None and len(store) > 0:
            # SOURCE "online": the store is the same on every rank; nothing is extracted
            merged = online_feature_sets(store)
            self.timings["store"] = time.perf_counter() - start
            ages = store.ages(iteration)
            what = f"{len(store)} instances of the online store"
            if ages is not None:
                what += f" (seen {int(ages.min())}-{int(ages.max())} steps ago, median {int(ages.median())})"
        else:
            if store is not None:
                logger.info(f"Prototype build at iteration {iteration}: the online store is empty (no "
                            "distillation step has filled it yet), so this build extracts features from "
                            "the image subset, as DISTILL.PROTOTYPES.SOURCE 'images' does")
            merged = self._image_features(model, teacher)
            what = f"{len(self.images())} images"
        what += whose
        selection = time.perf_counter()
        rebuild_bank(bank, merged, self.alpha, device=model.device, iteration=iteration,
                     class_names=self._class_names, cache_bytes=self.cache_bytes,
                     rank=comm.get_rank(), world_size=comm.get_world_size(), gather=comm.all_gather)
        elapsed = time.perf_counter() - start
        self.timings["selection"] = time.perf_counter() - selection
        message, warnings = build_report(bank, merged, what, elapsed, iteration, self.min_size,
                                         self._class_names, phases=self.timings)
        logger.info(message)
        for w in warnings:
            logger.warning(w)
        counts = torch.stack([bank.prototypes_per_class(s) for s in bank.strides]).float()
        storage = get_event_storage()
        storage.put_scalar(f"distill/prototype_refresh_time{suffix}", elapsed, smoothing_hint=False)
        storage.put_scalar(f"distill/prototypes_per_class{suffix}", counts.mean().item(), smoothing_hint=False)
        if store is not None:
            storage.put_scalar(f"distill/prototype_store_instances{suffix}", len(store), smoothing_hint=False)
