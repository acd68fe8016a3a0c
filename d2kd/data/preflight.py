"""A pre-flight report on a config's datasets (``tools/inspect_dataset.py``): what detectron2
loads, the boxes per class against the student's anchors, what prototype sampling will see,
and the iterations an epoch takes, with warnings for what would silently weaken training.

Everything is read the way training reads it: detectron2's dataset loaders and filters,
detectron2's anchor generator of the student's architecture, and d2kd's own prototype image
sampling (:func:`d2kd.engine.prototype_refresh.per_class_image_subsets`).
"""
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.structures import BoxMode

from .epochs import iterations_per_epoch, training_dataset

# A box under half the smallest anchor or over twice the largest (square root of the area,
# input pixels) overlaps its best concentric anchor with IoU < 0.25: below every matcher's
# foreground threshold. Warn when more than this share of a set's boxes is so far out.
FAR_OUTSIDE_SHARE = 0.01


@dataclass
class DatasetSummary:
    """One dataset of DATASETS.TRAIN / TEST as detectron2 loads it."""
    name: str
    role: str  # "train" or "test"
    records: int  # images in detectron2's dataset dicts
    with_boxes: int  # images holding a non-crowd box
    boxes: int  # non-crowd boxes
    crowd: int
    json_file: str = ""
    json_annotations: int = -1  # annotations in json_file (-1: no json)
    bad_segmentations: Dict[str, int] = field(default_factory=dict)  # form -> count


@dataclass
class ClassStats:
    """A class over the training set (sizes: square root of w x h, input pixels at the test resize)."""
    id: int
    name: str
    images: int
    boxes: int
    test_boxes: int
    size_min: float
    size_median: float
    size_max: float
    below_anchors: int
    above_anchors: int
    usable: int  # boxes wider and higher than PROTOTYPES.MIN_SIZE original pixels, whole set
    sampled_images: int  # the class' prototype images (up to MAX_IMAGES)
    sampled_instances: int  # its instances in them: what each prototype build sees


@dataclass
class Preflight:
    datasets: List[DatasetSummary]
    train_images: int  # after the training loader's filtering
    ims_per_batch: int
    iterations_per_epoch: float
    max_iter: int
    schedule_message: str
    prototype_images: int  # images a prototype build reads (the union of the per-class samples)
    anchors: List[Tuple[str, int, List[float]]]  # (feature, stride, anchor sizes)
    boxes_per_level: List[int]  # training boxes nearest (log scale) to each level's anchors
    classes: List[ClassStats]
    num_classes: int
    num_classes_key: str
    min_size: float
    max_images: int
    input_note: str
    warnings: List[str]


def segmentation_form(segm) -> Optional[str]:
    """None for a form detectron2's COCO loader reads (a list of flat [x1, y1, x2, y2, ...]
    polygons, an RLE dict with "counts", or nothing), else what it is and what the loader
    does with it (``load_coco_json``: a dict is taken as RLE; a polygon is kept when its
    length is even and >= 6, read as coordinates; an instance left without one is dropped)."""
    if not segm:
        return None
    if isinstance(segm, dict):
        return None if "counts" in segm else "a dict that is not RLE (no 'counts'): detectron2 raises KeyError"
    if not isinstance(segm, list):
        return f"a {type(segm).__name__}: detectron2 cannot read it"
    if all(isinstance(v, (int, float)) for v in segm):
        return "one flat list, not a list of polygons: detectron2 raises TypeError"
    if any(isinstance(poly, dict) for poly in segm):
        return "polygons given as dicts: the instance is dropped, box and all"
    if any(isinstance(v, dict) for poly in segm for v in poly):
        return ("polygons of point dicts ({'x': .., 'y': ..}): each point counts as one coordinate, so the "
                "instance is dropped, box and all, unless a polygon has an even number >= 6 of points")
    if any(isinstance(v, (list, tuple)) for poly in segm for v in poly):
        return ("polygons of [x, y] pairs: each pair counts as one coordinate, so the instance is dropped, "
                "box and all, unless a polygon has an even number >= 6 of points")
    if not any(len(p) % 2 == 0 and len(p) >= 6 for p in segm):
        return "no polygon of >= 3 points: the instance is dropped, box and all"
    return None


def _json_check(json_file: str) -> Tuple[int, Dict[str, int]]:
    with open(json_file) as f:
        data = json.load(f)
    anns = data.get("annotations", [])
    forms = Counter(form for form in (segmentation_form(a.get("segmentation")) for a in anns) if form)
    return len(anns), dict(forms)


def _summary(name: str, role: str, records: List[dict]) -> DatasetSummary:
    boxes = sum(1 for r in records for a in r.get("annotations", []) if not a.get("iscrowd", 0))
    crowd = sum(1 for r in records for a in r.get("annotations", []) if a.get("iscrowd", 0))
    with_boxes = sum(1 for r in records if any(not a.get("iscrowd", 0) for a in r.get("annotations", [])))
    summary = DatasetSummary(name, role, len(records), with_boxes, boxes, crowd)
    json_file = MetadataCatalog.get(name).get("json_file", None)
    if json_file and os.path.isfile(json_file):
        summary.json_file = json_file
        summary.json_annotations, summary.bad_segmentations = _json_check(json_file)
    return summary


def student_anchors(cfg):
    """(feature, stride, sorted anchor sizes) per level of the student's anchor generator, as
    detectron2 builds it for the config (a Distill architecture's plain counterpart, no
    teacher), with the number of classes it predicts, the key that sets it, and the key
    that sets the anchors."""
    from detectron2.modeling import build_model

    from ..modeling.kinds import is_distill_meta_arch, kind_of, plain_meta_arch_of

    plain = cfg.clone()
    plain.defrost()
    if is_distill_meta_arch(plain.MODEL.META_ARCHITECTURE):
        plain.MODEL.META_ARCHITECTURE = plain_meta_arch_of(plain.MODEL.META_ARCHITECTURE)
    plain.MODEL.DEVICE, plain.MODEL.WEIGHTS = "cpu", ""
    model = build_model(plain)
    kind = kind_of(model)
    generator = kind.anchor_generator(model)
    features = getattr(getattr(model, "proposal_generator", None), "in_features", None) or \
        getattr(model, "head_in_features", None) or [f"level {i}" for i in range(len(generator.strides))]
    levels = []
    for name, stride, cell in zip(features, generator.strides, generator.cell_anchors):
        sides = []
        for side in sorted(float(v) for v in ((cell[:, 2] - cell[:, 0]) * (cell[:, 3] - cell[:, 1])).sqrt()):
            if not sides or side > sides[-1] * 1.01:  # one size per aspect-ratio group (float noise)
                sides.append(side)
        levels.append((name, int(stride), [round(v, 1) for v in sides]))
    anchor_key = "MODEL.ANCHOR_GENERATOR.SIZES"
    if plain.MODEL.META_ARCHITECTURE == "GFL":  # d2kd's GFL: one anchor of OCTAVE_BASE_SCALE x stride
        anchor_key = ("MODEL.GFL.OCTAVE_BASE_SCALE (anchor side = scale x stride; GFL's ATSS takes a "
                      "per-box IoU threshold, so it is less strict than an IoU-matched head)")
    return levels, kind.num_classes(model), kind.num_classes_key or "MODEL.ROI_HEADS.NUM_CLASSES", anchor_key


def _input_scale(record: dict, cfg) -> float:
    """Input pixels per original pixel at the test-time resize."""
    if cfg.INPUT.MIN_SIZE_TEST <= 0:
        return 1.0
    h, w = record["height"], record["width"]
    new_h, _ = ResizeShortestEdge.get_output_shape(h, w, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return new_h / h


def preflight(cfg) -> Preflight:
    """The report on ``cfg``'s datasets; loading errors of a dataset are raised (a
    ``RuntimeError`` naming the dataset, with the json's segmentation forms when they explain it)."""
    from ..engine.prototype_refresh import (
        images_and_classes, per_class_image_subsets, prototype_schedule, prototype_source_dataset,
        usable_instances,
    )

    warnings: List[str] = []
    summaries, loaded = [], {}
    for role, names in (("train", cfg.DATASETS.TRAIN), ("test", cfg.DATASETS.TEST)):
        for name in names:
            try:
                loaded[name] = DatasetCatalog.get(name)
            except Exception as e:
                hint = ""
                json_file = MetadataCatalog.get(name).get("json_file", None) if name in DatasetCatalog.list() else None
                if json_file and os.path.isfile(json_file):
                    _, forms = _json_check(json_file)
                    if forms:
                        hint = " Segmentations detectron2 cannot read: " + "; ".join(
                            f"{n} x {form}" for form, n in forms.items()) + " (see datasets/README.md)."
                raise RuntimeError(f"detectron2 cannot load dataset '{name}' ({role}): "
                                   f"{type(e).__name__}: {e}.{hint}") from e
            summaries.append(_summary(name, role, loaded[name]))
    for s in summaries:
        if s.json_annotations > s.boxes + s.crowd:
            dropped = s.json_annotations - s.boxes - s.crowd
            forms = "; ".join(f"{n} x {form}" for form, n in s.bad_segmentations.items())
            warnings.append(
                f"{s.name}: {dropped} of the {s.json_annotations} annotations in {s.json_file} did not reach "
                f"detectron2's dataset dicts" + (f"; segmentations in forms it misreads: {forms}" if forms else "") +
                ". detectron2 drops an instance, box and all, whose segmentation holds no valid polygon: "
                "write polygons as COCO does (lists of flat [x1, y1, x2, y2, ...] lists), or leave "
                "'segmentation' out of a box-only set (datasets/README.md)"
            )
        if s.records and not s.with_boxes:
            warnings.append(f"{s.name} ({s.role}): none of its {s.records} images has a box")

    if not any(s.with_boxes for s in summaries if s.role == "train"):
        raise RuntimeError(
            f"no image of DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} has a box as detectron2 loads it, so "
            "detectron2 stops with 'No valid data found'. " + " ".join(warnings)
        )
    train = training_dataset(cfg)
    batch = cfg.SOLVER.IMS_PER_BATCH
    per_epoch = iterations_per_epoch(len(train), batch)
    schedule = prototype_schedule(cfg, len(train))
    warnings += schedule.warnings

    levels, num_classes, num_classes_key, anchor_key = student_anchors(cfg)
    all_sizes = [s for _, _, sizes in levels for s in sizes]
    smallest, largest = min(all_sizes), max(all_sizes)
    level_logs = [np.log(np.asarray(sizes)) for _, _, sizes in levels]

    thing_classes = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", []) or [])
    if thing_classes and len(thing_classes) != num_classes:
        warnings.append(f"DATASETS.TRAIN has {len(thing_classes)} classes ({', '.join(thing_classes)}) but "
                        f"{num_classes_key} = {num_classes}: set it to {len(thing_classes)} (the teacher's too)")

    sizes: Dict[int, List[float]] = {}
    images: Counter = Counter()
    boxes_per_level = [0] * len(levels)
    for record in train:
        scale = _input_scale(record, cfg)
        seen = set()
        for ann in record.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            side = math.sqrt(max(x1 - x0, 0.0) * max(y1 - y0, 0.0)) * scale
            c = int(ann["category_id"])
            sizes.setdefault(c, []).append(side)
            seen.add(c)
            if side > 0:
                nearest = [np.abs(logs - math.log(side)).min() for logs in level_logs]
                boxes_per_level[int(np.argmin(nearest))] += 1
        images.update(seen)
    test_boxes: Counter = Counter(
        int(a["category_id"]) for name in cfg.DATASETS.TEST for r in loaded[name]
        for a in r.get("annotations", []) if not a.get("iscrowd", 0))

    node = cfg.DISTILL.PROTOTYPES
    source = prototype_source_dataset(cfg.DATASETS.TRAIN)
    subsets = per_class_image_subsets(source, node.MAX_IMAGES, node.MIN_SIZE, cfg.SEED)
    usable = Counter(c for record in source for c in usable_instances(record, node.MIN_SIZE))
    sampled = {c: sum(usable_instances(source[i], node.MIN_SIZE).count(c) for i in idx.tolist())
               for c, idx in subsets.items()}

    ids = sorted(set(range(len(thing_classes) or num_classes)) | set(sizes))
    classes = []
    for c in ids:
        name = thing_classes[c] if c < len(thing_classes) else "?"
        s = np.asarray(sizes.get(c, []))
        classes.append(ClassStats(
            id=c, name=name, images=images[c], boxes=len(s), test_boxes=test_boxes[c],
            size_min=float(s.min()) if len(s) else 0.0, size_median=float(np.median(s)) if len(s) else 0.0,
            size_max=float(s.max()) if len(s) else 0.0,
            below_anchors=int((s < smallest / 2).sum()), above_anchors=int((s > 2 * largest).sum()),
            usable=usable[c], sampled_images=len(subsets.get(c, [])), sampled_instances=sampled.get(c, 0),
        ))
    for k in classes:
        label = f"class {k.id} ({k.name})"
        if k.id >= num_classes and k.boxes:
            warnings.append(f"{label} has {k.boxes} boxes but {num_classes_key} = {num_classes}: the model "
                            "cannot predict it; detectron2 fails on its labels. Set the number of classes")
        if k.boxes == 0:
            warnings.append(f"{label} has no box in DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}")
        elif k.sampled_instances < 2:
            warnings.append(
                f"{label}: {k.sampled_instances} usable instance(s) for prototypes (boxes wider and higher "
                f"than DISTILL.PROTOTYPES.MIN_SIZE={node.MIN_SIZE:g} original-image px in its "
                f"{k.sampled_images} sampled images), so no prototypes: no global term and robust weight 1 "
                f"for it. Lower DISTILL.PROTOTYPES.MIN_SIZE (its boxes: sqrt(w x h) {k.size_min:.0f}-{k.size_max:.0f} "
                "input px)"
            )
    total = sum(k.boxes for k in classes)
    below, above = sum(k.below_anchors for k in classes), sum(k.above_anchors for k in classes)
    if total and below > FAR_OUTSIDE_SHARE * total:
        warnings.append(
            f"{below} of {total} training boxes ({100 * below / total:.1f}%) are under half the smallest "
            f"anchor ({smallest:g} px; IoU < 0.25 with any anchor): add smaller anchors ({anchor_key}), "
            "or resize the input up (INPUT.MIN_SIZE_TRAIN / MIN_SIZE_TEST)")
    if total and above > FAR_OUTSIDE_SHARE * total:
        warnings.append(
            f"{above} of {total} training boxes ({100 * above / total:.1f}%) are over twice the largest "
            f"anchor ({largest:g} px): add larger anchors ({anchor_key}), or resize the input down")

    train_sizes = tuple(cfg.INPUT.MIN_SIZE_TRAIN)
    input_note = (f"box sizes are sqrt(w x h) in input pixels at the test resize (short side "
                  f"INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST}, long side at most MAX_SIZE_TEST "
                  f"{cfg.INPUT.MAX_SIZE_TEST}); training resizes the short side to {train_sizes} "
                  f"({cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING})")
    return Preflight(summaries, len(train), batch, per_epoch, cfg.SOLVER.MAX_ITER, schedule.message,
                     len(images_and_classes(subsets)), levels,
                     boxes_per_level, classes, num_classes, num_classes_key, node.MIN_SIZE, node.MAX_IMAGES,
                     input_note, warnings)


def format_preflight(report: Preflight) -> str:
    """The report as text with markdown tables."""
    from tabulate import tabulate

    out = ["## Datasets", tabulate(
        [[s.name, s.role, s.records, s.with_boxes, s.boxes, s.crowd,
          "-" if s.json_annotations < 0 else s.json_annotations - s.boxes - s.crowd] for s in report.datasets],
        headers=["dataset", "role", "images", "images with boxes", "boxes", "crowd boxes",
                 "json annotations dropped by detectron2"], tablefmt="pipe")]
    epochs = report.max_iter / report.iterations_per_epoch if report.iterations_per_epoch else 0.0
    out += ["", "## Epochs",
            f"{report.train_images} training images (after detectron2's filtering) at SOLVER.IMS_PER_BATCH "
            f"{report.ims_per_batch}: {report.iterations_per_epoch:g} iterations per epoch; SOLVER.MAX_ITER "
            f"{report.max_iter} is {epochs:.2f} epochs.", report.schedule_message,
            f"A prototype build reads {report.prototype_images} images (up to DISTILL.PROTOTYPES.MAX_IMAGES "
            f"{report.max_images} per class, drawn once from SEED)."]
    out += ["", "## Anchors of the student (input pixels)", tabulate(
        [[f, s, ", ".join(f"{a:g}" for a in sizes), n] for (f, s, sizes), n in zip(report.anchors, report.boxes_per_level)],
        headers=["feature", "stride", "anchor sizes", "training boxes nearest"], tablefmt="pipe")]
    out += ["", f"## Classes ({report.input_note})", tabulate(
        [[f"{k.id} {k.name}", k.images, k.boxes, k.test_boxes, f"{k.size_min:.0f} / {k.size_median:.0f} / {k.size_max:.0f}",
          k.below_anchors, k.above_anchors, k.usable, k.sampled_images, k.sampled_instances] for k in report.classes],
        headers=["class", "train images", "train boxes", "test boxes", "size min / median / max",
                 "< smallest anchor / 2", "> largest anchor x 2", f"boxes > MIN_SIZE {report.min_size:g} px",
                 f"prototype images (MAX_IMAGES {report.max_images})", "instances prototypes see"],
        tablefmt="pipe")]
    out += ["", f"## Warnings ({len(report.warnings)})"] + [f"- {w}" for w in report.warnings or ["none"]]
    return "\n".join(out)
