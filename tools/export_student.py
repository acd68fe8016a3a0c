#!/usr/bin/env python
"""Export a distilled student as a plain detectron2 model (weights + config). A plain
detector's config (a teacher, or a student trained alone) exports the same way.

    python tools/export_student.py --config-file configs/gk_faster_rcnn_R_50_FPN_2x_coco.yaml \
        --weights output/model_final.pth --output-dir release/ [--verify]

Only the student is built; the teacher is neither built nor loaded (its weights need not
exist). Everything is checked before anything is written, and the release is written as a
set (a temporary directory renamed into place): a wrong config or checkpoint leaves no files.

The release loads in stock detectron2 -- ``cfg.merge_from_file("release/config.yaml")``,
``DefaultPredictor(cfg)`` -- with no d2kd import. When the student uses a component only
d2kd registers and no stock builder can express (e.g. a ResNet-18 narrower than 64
channels), the export says so, copies the module that registers it (it needs only
detectron2) into the release, and the comment at the top of config.yaml says how to load it.

``--verify`` checks exactly that, before publishing: a separate Python process that cannot
import d2kd loads the release strictly (no missing or unexpected keys) and must predict what
the student predicts on validation images. The images come from ``--images DIR``, or from
a dataset (``--dataset``, default DATASETS.TEST[0]); a dataset of your own is registered by
``--register my_train_net.py``, the same script that registers it for training
(datasets/README.md).
"""
import argparse
import os
import runpy
import sys

from d2kd.config import load_config
from d2kd.export import (
    ExportError,
    ReleaseCheckError,
    check_output_dir,
    check_release,
    prepare_release,
    student_predictions,
    verification_images,
    write_release,
)
from d2kd.utils.logging import colour_wanted, setup_d2kd_logger
from detectron2.utils.logger import setup_logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the distillation config used for training")
    parser.add_argument("--weights", help="distillation checkpoint (default: OUTPUT_DIR/model_final.pth)")
    parser.add_argument("--output-dir", required=True, help="new, empty, or an earlier release (replaced)")
    parser.add_argument("--name", default="model_final", help="file name stem of the weights")
    parser.add_argument("--verify", action="store_true", help="check the release in stock detectron2 first")
    parser.add_argument("--register", action="append", default=[], metavar="FILE",
                        help="a Python file run first to register datasets (e.g. your train_net "
                             "launcher; its __main__ block is not run); repeatable")
    parser.add_argument("--dataset", help="dataset whose images --verify uses (default DATASETS.TEST[0])")
    parser.add_argument("--images", metavar="DIR", help="verify on the images of this folder instead")
    parser.add_argument("--num-images", type=int, default=8, help="images --verify compares on")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="detectron2", color=colour_wanted())
    setup_d2kd_logger()
    try:
        return export(args)
    except (ExportError, ReleaseCheckError, RuntimeError) as e:
        sys.exit(f"export_student: {e}")


def export(args):
    for path in args.register:
        if not os.path.isfile(path):
            raise ExportError(f"--register {path} does not exist")
        runpy.run_path(path, run_name="d2kd_register")  # not __main__: a launcher only registers
    cfg = load_config(args.config_file, args.opts)
    weights = args.weights or os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if not os.path.isfile(weights):
        raise ExportError(f"the checkpoint {weights} does not exist (pass --weights)")
    cfg.freeze()

    # Everything that can fail is checked before anything is written.
    check_output_dir(args.output_dir)
    images = verification_images(cfg, args.dataset, args.images, args.num_images) if args.verify else None
    release = prepare_release(cfg, weights, args.name)
    check, result = None, {}
    if args.verify:
        expected = student_predictions(cfg, weights, images)

        def check(directory, config_path, weights_path):
            modules = [os.path.join(directory, m) for m in release.modules]
            imports = [c.module for c in release.components if c.stock is None and not c.self_contained]
            result.update(check_release(config_path, weights_path, modules, images, expected,
                                        allow_d2kd=release.needs_d2kd, imports=imports,
                                        d2kd_config=bool(release.extra_keys)))

    weights_path, config_path = write_release(release, args.output_dir, check)
    print(f"weights: {weights_path}\nconfig:  {config_path}")
    for copy in release.modules:
        print(f"module:  {os.path.join(os.path.dirname(config_path), copy)}")
    for note in release.notes:
        print(("NEEDS: " if release.needs_modules else "note: ") + note.replace("<release>", os.path.dirname(config_path)))
    if not release.needs_modules:
        print("needs: stock detectron2 only")
    if args.verify:
        who = ("detectron2 with d2kd (which this release needs, see above)" if release.needs_d2kd else
               "stock detectron2 (plus the module(s) above, no d2kd)" if release.needs_modules else
               "stock detectron2 (no d2kd)")
        print(f"verified: {who} loads it with no missing or unexpected keys; "
              f"{result['images']} images, {result['detections']} detections, "
              f"max difference {result['max_difference']:.2g}")
    return weights_path, config_path


if __name__ == "__main__":
    main()
