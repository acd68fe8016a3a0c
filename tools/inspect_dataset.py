#!/usr/bin/env python
"""Pre-flight report on a config's datasets, before training on them.

    python tools/inspect_dataset.py --config-file my_gk.yaml [--register my_train_net.py] [KEY VALUE ...]

Prints, for DATASETS.TRAIN and DATASETS.TEST as detectron2 loads them: images, boxes and
annotations the loader dropped; the iterations an epoch takes at SOLVER.IMS_PER_BATCH and the
prototype schedule in iterations; the student's anchor sizes per level; per class the boxes,
their sizes against the anchors, and the instances prototype sampling will see with
DISTILL.PROTOTYPES.MIN_SIZE / MAX_IMAGES (d2kd's own sampling); then warnings (a class no
prototype can be built for, boxes far outside the anchors, a class count that does not match).
Exits 1 when there are warnings, 2 when a dataset cannot be loaded. Reads no image.
"""
import argparse
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import d2kd  # noqa: E402,F401
from d2kd.config import load_config  # noqa: E402
from d2kd.data.preflight import format_preflight, preflight  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--register", action="append", default=[], metavar="FILE",
                        help="a Python file run first to register datasets (e.g. your train_net "
                             "launcher; its `if __name__ == '__main__'` block does not run)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    for path in args.register:
        if not os.path.isfile(path):
            parser.error(f"--register {path} does not exist")
        runpy.run_path(path, run_name="d2kd_register")
    cfg = load_config(args.config_file, args.opts)
    try:
        report = preflight(cfg)
    except RuntimeError as e:
        print(f"inspect_dataset: {e}", file=sys.stderr)
        return 2
    print(format_preflight(report))
    return 1 if report.warnings else 0


if __name__ == "__main__":
    sys.exit(main())
