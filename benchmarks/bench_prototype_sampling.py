#!/usr/bin/env python
"""Instances per class that prototype selection sees: a total image budget vs per-class images.

    python benchmarks/bench_prototype_sampling.py [--images 118000] [--budget 800]

Builds COCO-like annotations without pixels: 80 classes whose image frequencies fall off as
a power law from ~50% of the images (COCO's "person") to ~0.2% (COCO's rarest), a few boxes
per class in an image, 70% of them larger than 30 px. Then counts, per class, the usable
instances (boxes > 30 px) in the images each rule draws:

- "total": ``--budget`` images drawn from the whole set (d2kd before the GK-fidelity fix);
- "per class": up to ``--budget`` images per class, each holding the class (the authors').
"""
import argparse
import os
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2kd.engine.prototype_refresh import images_and_classes, per_class_image_subsets  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402


def coco_like(num_images: int, num_classes: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    # image frequency of class c: 0.5 * (c + 1)^-a, a chosen so the rarest is ~0.2%
    a = np.log(0.5 / 0.002) / np.log(num_classes)
    freq = 0.5 * (np.arange(num_classes) + 1.0) ** -a
    records = []
    for i in range(num_images):
        anns = []
        for c in np.nonzero(rng.random(num_classes) < freq)[0]:
            for _ in range(1 + rng.poisson(1.0)):
                side = 40.0 if rng.random() < 0.7 else 20.0
                anns.append({"bbox": [0.0, 0.0, side, side], "bbox_mode": BoxMode.XYWH_ABS, "category_id": int(c)})
        records.append({"image_id": i, "annotations": anns})
    return records, freq


def usable(record, classes=None, min_size=30):
    out = Counter()
    for ann in record["annotations"]:
        if ann["bbox"][2] > min_size and ann["bbox"][3] > min_size and (classes is None or ann["category_id"] in classes):
            out[ann["category_id"]] += 1
    return out


def summary(counts, num_classes, k=10):
    values = np.array([counts.get(c, 0) for c in range(num_classes)])
    return (f"min {values.min()}, 10th pct {np.percentile(values, 10):.0f}, median {np.median(values):.0f}, "
            f"classes with < {k} instances: {(values < k).sum()}, with none: {(values == 0).sum()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=118000)
    parser.add_argument("--budget", type=int, default=800)
    args = parser.parse_args()
    records, freq = coco_like(args.images)
    print(f"{args.images} COCO-like images, 80 classes, class image frequency {freq[0]:.1%} ... {freq[-1]:.2%}")

    picked = np.random.default_rng(0).permutation(len(records))[: args.budget]
    total = Counter()
    for i in picked:
        total.update(usable(records[i]))
    print(f"total budget of {args.budget} images: {summary(total, 80)}")

    subsets = per_class_image_subsets(records, args.budget, 30, seed=0)
    union = images_and_classes(subsets)
    per_class = Counter()
    for i, classes in union:
        per_class.update(usable(records[i], set(classes)))
    print(f"{args.budget} images per class ({len(union)} distinct images): {summary(per_class, 80)}")


if __name__ == "__main__":
    main()
