#!/usr/bin/env python
"""Pictures of GK's prototypes and robust weights from a distillation checkpoint.

    python tools/visualize_prototypes.py --config-file <gk config> --weights output/model_final.pth \
        --output-dir output/prototypes [--num-images 100]

Writes ``prototypes_s<stride>_<class>.png`` (the prototype instances cropped from their training
images, in selection order) for every stride and class that has prototypes, and
``robust_weights.png``: a histogram per stride of the robust weights of the GT instances of
``--num-images`` validation images (each at the stride it is assigned to).
"""
import argparse
import os
import sys

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import d2kd  # noqa: E402,F401
from d2kd.checkpoint import AtomicDetectionCheckpointer  # noqa: E402
from d2kd.config import load_config  # noqa: E402
from d2kd.structures import assign_box_levels, shapes_by_stride  # noqa: E402
from d2kd.engine.prototype_refresh import (  # noqa: E402
    annotated_test_mapper,
    collect_instance_features,
    prototype_source_dataset,
)
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402


def prototype_galleries(bank, dataset, class_names, output_dir, crop_size=96):
    written = []
    for s in bank.strides:
        valid, source = bank.valid(s), bank.source(s)
        for c in range(bank.num_classes):
            rows = [source[c, k].tolist() for k in range(bank.num_prototypes) if valid[c, k]]
            if not rows:
                continue
            fig, axes = plt.subplots(1, len(rows), figsize=(1.6 * len(rows), 1.9), squeeze=False)
            for ax, (index, x1, y1, x2, y2) in zip(axes[0], rows):
                ax.set_xticks([])
                ax.set_yticks([])
                if index < 0:
                    ax.set_title("unknown", fontsize=7)
                    continue
                image = cv2.imread(dataset[int(index)]["file_name"])
                h, w = image.shape[:2]
                x1, y1 = max(int(x1), 0), max(int(y1), 0)
                x2, y2 = min(int(round(x2)) + 1, w), min(int(round(y2)) + 1, h)
                crop = cv2.resize(image[y1:y2, x1:x2], (crop_size, crop_size))
                ax.imshow(crop[:, :, ::-1])
                ax.set_title(f"#{int(index)}", fontsize=7)
            fig.suptitle(f"{class_names[c]}, stride {s}", fontsize=9)
            fig.tight_layout()
            path = os.path.join(output_dir, f"prototypes_s{s}_{class_names[c]}.png")
            fig.savefig(path, dpi=80)
            plt.close(fig)
            written.append(path)
    return written


def robust_weight_histogram(model, cfg, num_images, output_dir):
    bank = model.prototype_bank
    dataset_name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else cfg.DATASETS.TRAIN[0]
    records = get_detection_dataset_dicts([dataset_name], filter_empty=True)[:num_images]
    mapper = annotated_test_mapper(cfg)
    batches = ([mapper(r) for r in records[i: i + 8]] for i in range(0, len(records), 8))
    features = collect_instance_features(model, batches, min_size=0)
    fig, axes = plt.subplots(1, len(bank.strides), figsize=(3 * len(bank.strides), 2.6), squeeze=False)
    for ax, s in zip(axes[0], bank.strides):
        weights = []
        for c, (f_s, f_t, src) in features.get(s, {}).items():
            assigned = assign_box_levels(src[:, 1:], list(shapes_by_stride(model.backbone))) == s
            if assigned.any():
                classes = torch.full((int(assigned.sum()),), c, dtype=torch.long, device=model.device)
                weights.append(bank.robust_weights(s, classes, f_s[assigned].to(model.device), f_t[assigned].to(model.device)).cpu())
        weights = torch.cat(weights) if weights else torch.zeros(0)
        ax.hist(weights.numpy(), bins=20, range=(0, 1))
        ax.set_title(f"stride {s}: {len(weights)} instances, mean {weights.mean():.2f}" if len(weights) else f"stride {s}: none", fontsize=8)
        ax.set_xlabel("robust weight")
    fig.tight_layout()
    path = os.path.join(output_dir, "robust_weights.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="a d2kd checkpoint holding a prototype bank")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-images", type=int, default=100, help="validation images for the histogram")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    model = build_model(cfg)
    if getattr(model, "prototype_bank", None) is None:
        sys.exit("visualize_prototypes: this config enables no head that uses prototypes (e.g. DISTILL.HEADS ['gk'])")
    AtomicDetectionCheckpointer(model).load(args.weights)
    if not model.prototype_bank.is_built:
        sys.exit(f"visualize_prototypes: {args.weights} holds no built prototypes (trained before "
                 "DISTILL.PROTOTYPES.START_ITER / START_EPOCHS?)")
    model.eval()
    os.makedirs(args.output_dir, exist_ok=True)
    classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes") or [str(i) for i in range(model.prototype_bank.num_classes)]
    galleries = prototype_galleries(model.prototype_bank, prototype_source_dataset(cfg.DATASETS.TRAIN), classes, args.output_dir)
    histogram = robust_weight_histogram(model, cfg, args.num_images, args.output_dir)
    print(f"wrote {len(galleries)} prototype galleries and {histogram} into {args.output_dir}")


if __name__ == "__main__":
    main()
