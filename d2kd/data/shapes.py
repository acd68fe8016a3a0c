"""The built-in synthetic detection set ``d2kd_shapes_{train,val}``, in COCO format.

Six classes of shapes that differ in outline (circle, square, triangle, star, cross, ring) on
textured backgrounds, with what makes real detection hard and distillation useful: overlapping
colour and texture distributions per class (so colour alone does not solve it), a wide range of
scales, several instances per image, unlabelled distractors (elongated ellipses, arcs, irregular
blobs, bars, lines), occlusion, truncation at the borders, and blurred, noisy or
semi-transparent instances.

Generation is deterministic (one ``np.random.Generator`` per image, seeded by ``(seed, index)``)
and takes seconds. It happens on first use, into a cache directory (never the repository):
``$D2KD_CACHE/shapes-v2``, by default ``~/.cache/d2kd/shapes-v2``. Every file is written to a
temporary name and renamed; the split's json is written last, so an interrupted generation is
redone rather than half used, and concurrent processes never read a partial file.
"""
import json
import logging
import os

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..utils.atomic import atomic_write

logger = logging.getLogger(__name__)

# Bump when anything below changes what is generated: it names the cache directory.
GENERATOR_VERSION = "shapes-v2"
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]
IMAGE_SIZE = 128
# split -> (number of images, seed)
SPLITS = {"train": (1000, 0), "val": (200, 1)}
DATASET_PREFIX = "d2kd_shapes"

# Objects per image, and object size (longest side of the unrotated shape, px) drawn
# log-uniformly. Below ~12 px the shapes are no longer distinguishable at stride 4.
_NUM_OBJECTS = (2, 6)
_NUM_DISTRACTORS = (0, 2)
_SIZE_RANGE = (12.0, 64.0)
# A placement is retried while its box overlaps an earlier one by more than this IoU.
_MAX_PLACEMENT_IOU = 0.45
# An object stays annotated if this fraction of its full shape is visible (not occluded,
# not outside the image); otherwise it is left unlabelled, like a distractor.
_MIN_VISIBLE_FRACTION = 0.35
_MIN_BOX_SIDE = 4
# Hue centre (degrees) of each class; 60% of the instances draw their hue near it, the rest
# uniformly, so colour is a hint and not a label.
_CLASS_HUE = [0.0, 60.0, 120.0, 180.0, 240.0, 300.0]
_CLASS_HUE_PROB = 0.75
_CLASS_HUE_STD = 30.0
_PAD = 64  # shapes are drawn on a padded canvas so truncated parts count in the full area


def default_root():
    """The cache directory of the current generator version (not created here)."""
    base = os.path.expanduser(os.environ.get("D2KD_CACHE", "~/.cache/d2kd"))
    return os.path.join(base, GENERATOR_VERSION)


def _random_color(rng, class_id=None):
    if class_id is not None and rng.random() < _CLASS_HUE_PROB:
        hue = rng.normal(_CLASS_HUE[class_id], _CLASS_HUE_STD) % 360.0
    else:
        hue = rng.uniform(0.0, 360.0)
    hsv = np.array(
        [[[hue / 2.0, rng.uniform(70, 255), rng.uniform(90, 255)]]], dtype=np.float32
    ).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(rng, size):
    """A smooth random colour field, sometimes with faint stripes, plus pixel noise."""
    base = _random_color(rng)
    cells = int(rng.integers(3, 9))
    low = rng.normal(0.0, 25.0, size=(cells, cells, 3)).astype(np.float32)
    img = base + cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.25:
        img += _stripes(rng, size) * rng.uniform(6, 18)
    img += rng.normal(0.0, rng.uniform(2, 8), size=img.shape)
    return np.clip(img, 0, 255)


def _stripes(rng, size):
    """(size, size, 1) in [-1, 1]: a sine grating of random period and orientation."""
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(4, 16)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period)
    return np.sin(phase)[..., None]


def _texture(rng, size, class_id):
    """(size, size, 3) float colour layer: solid, gradient, stripes or speckle."""
    c1 = _random_color(rng, class_id)
    kind = rng.choice(4, p=[0.7, 0.1, 0.1, 0.1])
    if kind == 0:
        return np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
    if kind == 1:
        c2 = _random_color(rng)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        t = np.clip(0.5 + (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta), 0, 1)
        return c1 * (1 - t[..., None]) + c2 * t[..., None]
    if kind == 2:
        c2 = _random_color(rng)
        t = (_stripes(rng, size) + 1) / 2
        return c1 * (1 - t) + c2 * t
    return c1 + rng.normal(0.0, rng.uniform(15, 40), size=(size, size, 3)).astype(np.float32)


def _rotate(points, theta):
    c, s = np.cos(theta), np.sin(theta)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _fill(mask, points, cx, cy):
    pts = np.round(points + (cx, cy)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA)


def _draw_object(mask, rng, class_id, cx, cy, size):
    """Rasterise one object of ``CLASSES[class_id]`` into ``mask`` (uint8, in place)."""
    r = size / 2.0
    theta = rng.uniform(0, 2 * np.pi)
    name = CLASSES[class_id]
    if name == "circle":
        # A slight ellipse, so "round" and not "perfect circle" is what is learnt.
        axes = (int(round(r)), int(round(r * rng.uniform(0.88, 1.0))))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, np.degrees(theta), 0, 360, 255, -1,
                    cv2.LINE_AA)
    elif name == "square":
        a = r * 0.8
        pts = np.array([[-a, -a], [a, -a], [a, a], [-a, a]]) * (1, rng.uniform(0.85, 1.0))
        _fill(mask, _rotate(pts, theta), cx, cy)
    elif name == "triangle":
        ang = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3 + rng.normal(0, 0.12, 3)
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * r
        _fill(mask, _rotate(pts, theta), cx, cy)
    elif name == "star":
        n = 5
        inner = rng.uniform(0.38, 0.55)
        ang = np.arange(2 * n) * np.pi / n
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
        pts = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
        _fill(mask, _rotate(pts, theta), cx, cy)
    elif name == "cross":
        w = r * rng.uniform(0.28, 0.42)
        for pts in (np.array([[-r, -w], [r, -w], [r, w], [-r, w]]),
                    np.array([[-w, -r], [w, -r], [w, r], [-w, r]])):
            _fill(mask, _rotate(pts, theta), cx, cy)
    elif name == "ring":
        thickness = max(2, int(round(r * rng.uniform(0.25, 0.45))))
        radius = max(1, int(round(r - thickness / 2)))
        cv2.circle(mask, (int(cx), int(cy)), radius, 255, thickness, cv2.LINE_AA)
    else:
        raise ValueError(name)


def _draw_distractor(mask, rng, cx, cy, size):
    """Rasterise one unlabelled clutter shape, some of them near-misses of the classes."""
    r = size / 2.0
    theta = rng.uniform(0, 2 * np.pi)
    kind = rng.integers(5)
    if kind == 0:  # elongated ellipse (not a circle)
        axes = (int(round(r)), max(2, int(round(r * rng.uniform(0.15, 0.4)))))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, np.degrees(theta), 0, 360, 255, -1,
                    cv2.LINE_AA)
    elif kind == 1:  # open arc (not a ring)
        thickness = max(2, int(round(r * rng.uniform(0.2, 0.4))))
        cv2.ellipse(mask, (int(cx), int(cy)), (int(round(r)), int(round(r))),
                    np.degrees(theta), 0, rng.uniform(90, 220), 255, thickness, cv2.LINE_AA)
    elif kind == 2:  # irregular blob
        n = int(rng.integers(6, 11))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = r * rng.uniform(0.45, 1.0, n)
        pts = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
        _fill(mask, pts, cx, cy)
    elif kind == 3:  # long bar (not a square)
        w = r * rng.uniform(0.12, 0.3)
        pts = np.array([[-r, -w], [r, -w], [r, w], [-r, w]])
        _fill(mask, _rotate(pts, theta), cx, cy)
    else:  # polyline scribble
        pts = np.round(rng.uniform(-r, r, size=(int(rng.integers(2, 5)), 2)) + (cx, cy))
        cv2.polylines(mask, [pts.astype(np.int32)], False, 255,
                      int(rng.integers(1, 4)), cv2.LINE_AA)


def _box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-6)


def render_image(rng, size=IMAGE_SIZE):
    """Draw one image.

    Returns:
        image (ndarray): (size, size, 3) uint8, BGR.
        objects (list[dict]): per annotated object ``category_id`` (0-based), ``bbox``
            ``[x, y, w, h]`` of its visible pixels (clipped to the image), ``area`` (visible
            pixel count).
    """
    img = _background(rng, size)
    canvas = size + 2 * _PAD
    log_lo, log_hi = np.log(_SIZE_RANGE[0]), np.log(_SIZE_RANGE[1])

    items = []  # (class_id or -1, cx, cy, size)
    placed = []
    for _ in range(int(rng.integers(_NUM_OBJECTS[0], _NUM_OBJECTS[1] + 1))):
        for _attempt in range(20):
            s = float(np.exp(rng.uniform(log_lo, log_hi)))
            cx, cy = rng.uniform(-0.25 * s, size + 0.25 * s, 2)
            box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
            if all(_box_iou(box, p) <= _MAX_PLACEMENT_IOU for p in placed):
                placed.append(box)
                items.append((int(rng.integers(len(CLASSES))), cx, cy, s))
                break
    for _ in range(int(rng.integers(_NUM_DISTRACTORS[0], _NUM_DISTRACTORS[1] + 1))):
        s = float(np.exp(rng.uniform(log_lo, log_hi)))
        items.append((-1, *rng.uniform(0, size, 2), s))
    order = rng.permutation(len(items))

    # owner[y, x]: index into items of the shape on top at that pixel, -1 for background.
    owner = np.full((size, size), -1, dtype=np.int32)
    full_area = {}
    for idx in order:
        class_id, cx, cy, s = items[idx]
        mask = np.zeros((canvas, canvas), dtype=np.uint8)
        if class_id >= 0:
            _draw_object(mask, rng, class_id, cx + _PAD, cy + _PAD, s)
            full_area[idx] = int((mask > 127).sum())
        else:
            _draw_distractor(mask, rng, cx + _PAD, cy + _PAD, s)
        alpha = mask[_PAD:_PAD + size, _PAD:_PAD + size].astype(np.float32) / 255.0
        tex = _texture(rng, size, class_id if class_id >= 0 else None)
        # Ambiguous instances: blurred, noisy, or semi-transparent.
        if rng.random() < 0.12:
            sigma = rng.uniform(0.8, 2.2)
            alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
            tex = cv2.GaussianBlur(np.ascontiguousarray(tex), (0, 0), sigma)
        if rng.random() < 0.12:
            tex = tex + rng.normal(0.0, rng.uniform(20, 45), size=tex.shape)
        if rng.random() < 0.1:
            alpha = alpha * rng.uniform(0.6, 0.85)
        a = alpha[..., None]
        img = img * (1 - a) + tex * a
        owner[alpha > 0.5] = idx

    img += rng.normal(0.0, rng.uniform(0, 6), size=img.shape)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    objects = []
    for idx, (class_id, _, _, _) in enumerate(items):
        if class_id < 0:
            continue
        ys, xs = np.nonzero(owner == idx)
        if len(xs) == 0 or len(xs) < _MIN_VISIBLE_FRACTION * max(full_area[idx], 1):
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        if min(x1 - x0, y1 - y0) < _MIN_BOX_SIDE:
            continue
        objects.append({"category_id": class_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": int(len(xs))})
    return image, objects


def _split_info(split, num_images, seed, image_size):
    return {"description": f"d2kd synthetic shapes, {split}", "version": GENERATOR_VERSION,
            "num_images": num_images, "seed": seed, "image_size": image_size}


def generate_shapes_split(root, split, num_images, seed, image_size=IMAGE_SIZE):
    """Write ``<root>/<split>/*.png`` and then, last and atomically, ``<root>/<split>.json``.

    Returns:
        str: the json path.
    """
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        image, objects = render_image(rng, image_size)
        file_name = f"{i:06d}.png"
        ok, buf = cv2.imencode(".png", image)
        assert ok
        atomic_write(os.path.join(image_dir, file_name), buf.tobytes())
        images.append({"id": i + 1, "file_name": file_name,
                       "width": image_size, "height": image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": obj["category_id"] + 1, "bbox": obj["bbox"],
                                "area": obj["area"], "iscrowd": 0})
    coco = {
        "info": _split_info(split, num_images, seed, image_size),
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(CLASSES)],
    }
    json_file = os.path.join(root, f"{split}.json")
    atomic_write(json_file, json.dumps(coco))
    logger.info("Generated %d %s images (%d objects) under %s",
                num_images, split, len(annotations), root)
    return json_file


def _split_is_current(json_file, split, num_images, seed, image_size):
    try:
        with open(json_file) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError):
        return False
    return info == _split_info(split, num_images, seed, image_size)


def _ensure_split(root, split):
    num_images, seed = SPLITS[split]
    json_file = os.path.join(root, f"{split}.json")
    if not _split_is_current(json_file, split, num_images, seed, IMAGE_SIZE):
        generate_shapes_split(root, split, num_images, seed, IMAGE_SIZE)
    return json_file


def _split_of(dataset_name):
    prefix = DATASET_PREFIX + "_"
    if not dataset_name.startswith(prefix) or dataset_name[len(prefix):] not in SPLITS:
        raise KeyError(f"{dataset_name!r} is not a d2kd shapes dataset")
    return dataset_name[len(prefix):]


def ensure_shapes_generated(dataset_name):
    """Generate a registered shapes split if needed; return its json path.

    COCOEvaluator reads ``json_file`` when it is constructed, so call this first.
    """
    split = _split_of(dataset_name)
    root = os.path.dirname(MetadataCatalog.get(dataset_name).json_file)
    return _ensure_split(root, split)


def register_shapes_datasets(root=None):
    """Register ``d2kd_shapes_train`` and ``d2kd_shapes_val``; nothing is generated yet.

    Calling it again with the same root does nothing; with another root it re-registers both
    datasets there.

    Args:
        root (str or None): the cache directory; None means :func:`default_root`.
    """
    root = os.path.abspath(os.path.expanduser(root or default_root()))
    for split in SPLITS:
        name = f"{DATASET_PREFIX}_{split}"
        json_file = os.path.join(root, f"{split}.json")
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        image_root = os.path.join(root, split)

        def load(root=root, split=split, image_root=image_root, name=name):
            return load_coco_json(_ensure_split(root, split), image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(thing_classes=list(CLASSES), json_file=json_file,
                                      image_root=image_root, evaluator_type="coco")
