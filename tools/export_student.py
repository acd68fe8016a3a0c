#!/usr/bin/env python
"""Export a distilled student as a plain detectron2 model (weights + config). A plain
detector's config (a teacher, or a student trained alone) exports the same way.

    python tools/export_student.py --config-file configs/gk_faster_rcnn_R_50_FPN_2x_coco.yaml \
        --weights output/model_final.pth --output-dir release/ [--verify]

Only the student is built; the teacher is neither built nor loaded (its weights need not
exist). Everything is checked before anything is written, and the release is written as a
set (a temporary directory renamed into place): a wrong config or checkpoint leaves no files.

The release loads in stock detectron2 with no d2kd import, from wherever it is copied
(``MODEL.WEIGHTS`` is relative to the config's folder; the snippet at the top of
config.yaml resolves it). When the student uses a component only d2kd registers and no stock
builder can express (e.g. a ResNet-18 narrower than 64 channels), the export says so, copies
the module that registers it (it needs only detectron2) into the release, and the comment at
the top of config.yaml says how to load it. ``release.json`` lists the release's files: an
export replaces only a folder whose manifest lists exactly what it holds.

``--verify`` checks exactly that, before publishing: a separate Python process that cannot
import d2kd loads the release strictly (no missing or unexpected keys) and must predict what
the student predicts on validation images. The images come from ``--images DIR``, or from
a dataset (``--dataset``, default DATASETS.TEST[0]); a dataset of your own is registered by
``--register my_train_net.py``, the same script that registers it for training
(datasets/README.md).

``--format torchscript`` adds the traced student (``<name>_<md5[:6]>.ts``, see d2kd/deploy.py
for its input and outputs), published only when it predicts the eager student's boxes,
scores and classes on the verification images (within 1e-4, classes equal).

``--zoo DIR`` publishes into a model zoo instead: a verified release with TorchScript in
``DIR/<name>/`` (``<name>``: the config's path under configs/, without ``.yaml``), listed with
its metrics (``final_results.json`` beside the weights, or ``--metrics``), teacher, training
time, parameters, GFLOPs and md5 in ``DIR/index.json`` and ``DIR/MODEL_ZOO.md``. Served over
http(s) or read directly, the zoo is what ``d2kd://`` URIs and ``d2kd.model_zoo.get`` read.

    python tools/export_student.py --config-file configs/shapes/gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml \
        --weights output/demo/gk_seed0/model_final.pth --zoo output/zoo
"""
import argparse
import json
import os
import re
import runpy
import sys

from d2kd.config import load_config
from d2kd.deploy import FORMATS
from d2kd.export import ExportError, ReleaseCheckError, check_output_dir, export_release, verification_images
from d2kd.utils.logging import colour_wanted, setup_d2kd_logger
from detectron2.utils.logger import setup_logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the distillation config used for training")
    parser.add_argument("--weights", help="distillation checkpoint (default: OUTPUT_DIR/model_final.pth)")
    parser.add_argument("--output-dir", help="new, empty, or an earlier release written by this tool (replaced)")
    parser.add_argument("--name", default="model_final", help="file name stem of the weights")
    parser.add_argument("--verify", action="store_true", help="check the release in stock detectron2 first")
    parser.add_argument("--format", action="append", default=[], choices=FORMATS,
                        help="also export the student in this deployment format (checked against the "
                             "eager student on the verification images; implies --verify)")
    parser.add_argument("--zoo", metavar="DIR",
                        help="publish into the zoo DIR: a verified release (with TorchScript) in "
                             "DIR/<zoo name>/, listed in DIR/index.json and DIR/MODEL_ZOO.md")
    parser.add_argument("--zoo-name", help="name in the zoo (default: the config's path under configs/, "
                                           "or its file name for a config of your own)")
    parser.add_argument("--metrics", metavar="FILE", help="JSON of the evaluation to record with --zoo "
                                                          "(default: final_results.json beside the weights)")
    parser.add_argument("--latency-images", type=int, default=0, metavar="N",
                        help="with --zoo: time the release (eager and TorchScript, 1 and 2 threads) on "
                             "N images of the verification dataset and record it")
    parser.add_argument("--teacher", help="the teacher's zoo name or URI to record with --zoo "
                                          "(default: the zoo name of a shipped teacher config)")
    parser.add_argument("--register", action="append", default=[], metavar="FILE",
                        help="a Python file run first to register datasets (e.g. your train_net "
                             "launcher; its __main__ block is not run); repeatable")
    parser.add_argument("--dataset", help="dataset whose images --verify uses (default DATASETS.TEST[0])")
    parser.add_argument("--images", metavar="DIR", help="verify on the images of this folder instead")
    parser.add_argument("--num-images", type=int, default=8, help="images --verify compares on")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if bool(args.output_dir) == bool(args.zoo):
        parser.error("give exactly one of --output-dir DIR (a release) and --zoo DIR (publish into a zoo)")
    return args


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="detectron2", color=colour_wanted())
    setup_d2kd_logger()
    try:
        return export(args)
    except (ExportError, ReleaseCheckError, RuntimeError) as e:
        sys.exit(f"export_student: {e}")


def _train_time_s(weights: str):
    """The training time of the run that wrote ``weights``: its stage's train_time.json, or
    detectron2's "Total training time" line in its log.txt."""
    folder = os.path.dirname(os.path.abspath(weights))
    stage = os.path.join(folder, "train_time.json")
    if os.path.isfile(stage):
        with open(stage) as f:
            return json.load(f).get("seconds")
    log = os.path.join(folder, "log.txt")
    if os.path.isfile(log):
        found = re.findall(r"Total training time: (\d+):(\d\d):(\d\d)", open(log).read())
        if found:
            h, m, s = map(int, found[-1])
            return 3600 * h + 60 * m + s
    return None


def _metrics(args, weights):
    path = args.metrics or os.path.join(os.path.dirname(os.path.abspath(weights)), "final_results.json")
    if not os.path.isfile(path):
        if args.metrics:
            raise ExportError(f"--metrics {args.metrics} does not exist")
        return None
    with open(path) as f:
        metrics = json.load(f)
    return dict(metrics.get("bbox", metrics))


def _zoo_name(args):
    from d2kd.model_zoo.model_zoo import configs_dir, zoo_name

    if args.zoo_name:
        return zoo_name(args.zoo_name)
    path, root = os.path.abspath(args.config_file), configs_dir()
    return zoo_name(os.path.relpath(path, root) if path.startswith(root + os.sep) else os.path.basename(path))


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
    formats = list(dict.fromkeys(args.format + (["torchscript"] if args.zoo else [])))
    verify = args.verify or bool(formats) or bool(args.zoo)

    # Everything that can fail is checked before anything is written.
    if args.zoo:
        from d2kd.model_zoo.publish import publish

        name = _zoo_name(args)
        check_output_dir(os.path.join(args.zoo, name))
        images = verification_images(cfg, args.dataset, args.images, args.num_images)
        timed = verification_images(cfg, args.dataset, args.images, args.latency_images) if args.latency_images else ()
        entry = publish(args.zoo, name, cfg, weights, images=images, formats=formats,
                        metrics=_metrics(args, weights), teacher=args.teacher, train_time_s=_train_time_s(weights),
                        latency_images=timed)
        print(f"published: {name} into the zoo {os.path.abspath(args.zoo)}")
        print(f"uri:     d2kd://{name}/{entry['weights']} (md5 {entry['md5']})")
        if entry["torchscript"]:
            print(f"torchscript: d2kd://{name}/{entry['torchscript']}")
        print(f"index:   {os.path.join(os.path.abspath(args.zoo), 'index.json')}")
        _print_check(entry["check"], bool(entry["torchscript"]))
        return entry
    check_output_dir(args.output_dir)
    images = verification_images(cfg, args.dataset, args.images, args.num_images) if verify else None
    result = export_release(cfg, weights, args.output_dir, name=args.name, images=images, formats=formats)
    release = result.release
    print(f"weights: {result.weights_path}\nconfig:  {result.config_path}")
    if result.torchscript_path:
        print(f"torchscript: {result.torchscript_path}")
    for copy in release.modules:
        print(f"module:  {os.path.join(os.path.dirname(result.config_path), copy)}")
    for note in release.notes:
        print(("NEEDS: " if release.needs_modules else "note: ") +
              note.replace("<release>", os.path.dirname(result.config_path)))
    if not release.needs_modules:
        print("needs: stock detectron2 only")
    if verify:
        who = ("detectron2 with d2kd (which this release needs, see above)" if release.needs_d2kd else
               "stock detectron2 (plus the module(s) above, no d2kd)" if release.needs_modules else
               "stock detectron2 (no d2kd)")
        print(f"verified: {who} loads it with no missing or unexpected keys; "
              f"{result.check['images']} images, {result.check['detections']} detections, "
              f"max difference {result.check['max_difference']:.2g}")
        _print_check(result.check, bool(result.torchscript_path), eager=False)
    return result.weights_path, result.config_path


def _print_check(check, torchscript, eager=True):
    if eager:
        print(f"verified: a process without d2kd loads it strictly; {check['images']} images, "
              f"{check['detections']} detections, max difference {check['max_difference']:.2g}")
    if torchscript:
        print(f"verified: TorchScript predicts the same boxes, scores and classes (max difference "
              f"{check['torchscript_max_difference']:.2g}, tolerance 1e-4)")


if __name__ == "__main__":
    main()
