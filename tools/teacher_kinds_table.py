#!/usr/bin/env python
"""Which teacher kinds each distillation head accepts, for each student kind: the README's
"Teachers" table, found by building every (head, student, teacher) model d2kd's own build
checks decide on (head requirements, paired anchors, towers, classes), never written by hand.

    python tools/teacher_kinds_table.py    # ~3 min on 2 CPU cores

The students and teachers are the built-in data's configs (configs/shapes/), with random
teacher weights saved to a temporary folder; every head runs with its defaults. A cell lists
the teachers whose model builds; a head that cannot take some teacher says why in the build
error, of which the first line is printed below the table. The ViTDet teacher is a LazyConfig
(`vitdet_faster_rcnn_ViT_tiny_SFP_2k_shapes.py`: detectron2's ViT + SimpleFeaturePyramid with a
Faster R-CNN head).
"""
import os
import sys
import tempfile
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import d2kd  # noqa: E402,F401
from d2kd.config import load_config  # noqa: E402
from d2kd.heads import available_heads  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

SHAPES = os.path.join(REPO, "configs", "shapes")
STUDENTS = {  # name -> (plain config, its Distill meta-architecture)
    "Faster R-CNN": ("faster_rcnn_R_18_half_FPN_1k_shapes.yaml", "DistillRCNN"),
    "RetinaNet": ("retinanet_R_18_half_FPN_1k_shapes.yaml", "DistillRetinaNet"),
    "GFL": ("gfl_R_18_half_FPN_1k_shapes.yaml", "DistillGFL"),
}
# Settings the built-in data needs whatever the pair: its dense heads have 2 tower blocks
# (CrossKD's default cut, 3 of 4 blocks, becomes 1 of 2: the same place from the end).
DATA_OPTIONS = {"crosskd": ["DISTILL.CROSSKD.LAYER", "1"]}
# A head whose build error says how to do without a requirement is built again that way; the
# cell names the change (GK from a teacher of another kind: no response term).
FALLBACKS = {"gk": (["DISTILL.GK.RESPONSE_WEIGHT", "0.0"], "response term off")}
TEACHERS = {
    "Faster R-CNN": "faster_rcnn_R_18_FPN_1k_shapes.yaml",
    "Cascade R-CNN": "cascade_rcnn_R_18_FPN_1k_shapes.yaml",
    "RetinaNet": "retinanet_R_18_FPN_2k_shapes.yaml",
    "GFL": "gfl_R_18_FPN_2k_shapes.yaml",
    "ViTDet (LazyConfig)": "vitdet_faster_rcnn_ViT_tiny_SFP_2k_shapes.py",
}


def save_random_teachers(folder: str) -> Dict[str, str]:
    weights = {}
    for name, config in TEACHERS.items():
        torch.manual_seed(0)
        if config.endswith(".py"):
            from detectron2.config import LazyConfig, instantiate

            model = instantiate(LazyConfig.load(os.path.join(SHAPES, config)).model)
        else:
            model = build_model(load_config(os.path.join(SHAPES, config), ["MODEL.DEVICE", "cpu"]))
        path = os.path.join(folder, os.path.splitext(config)[0] + ".pth")
        torch.save({"model": model.state_dict()}, path)
        weights[name] = path
    return weights


def _build(config: str, opts: List[str]):
    """None when the model builds, else the first line of the build's error."""
    try:
        build_model(load_config(os.path.join(SHAPES, config), opts))
        return None
    except Exception as e:  # the build's own checks: the message says why
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"


def compatibility() -> Tuple[Dict[str, Dict[str, List[str]]], Dict[Tuple[str, str, str], str]]:
    """head -> student -> teachers that build; and (head, student, teacher) -> why not."""
    table, why = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        weights = save_random_teachers(folder)
        for head in sorted(available_heads()):
            table[head] = {}
            for student, (config, meta_arch) in STUDENTS.items():
                table[head][student] = []
                for teacher, teacher_config in TEACHERS.items():
                    opts = [
                        "MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", meta_arch,
                        "DISTILL.HEADS", f'["{head}"]',
                        "DISTILL.TEACHER.CONFIG_FILE", os.path.join(SHAPES, teacher_config),
                        "DISTILL.TEACHER.WEIGHTS", weights[teacher], *DATA_OPTIONS.get(head, []),
                    ]
                    error = _build(config, opts)
                    if error is None:
                        table[head][student].append(teacher)
                        continue
                    if head in FALLBACKS and _build(config, opts + FALLBACKS[head][0]) is None:
                        table[head][student].append(f"{teacher} ({FALLBACKS[head][1]})")
                        continue
                    why[(head, student, teacher)] = error
    return table, why


def main():
    torch.set_num_threads(1)
    table, why = compatibility()
    print("| head | " + " | ".join(f"{s} student" for s in STUDENTS) + " |")
    print("|---|" + "---|" * len(STUDENTS))
    for head, cells in table.items():
        print(f"| `{head}` | " + " | ".join(", ".join(cells[s]) or "—" for s in STUDENTS) + " |")
    print("\nWhy not (the first line of each build error):")
    for (head, student, teacher), message in why.items():
        print(f"- {head}, {student} student <- {teacher} teacher: {message[:220]}")


if __name__ == "__main__":
    main()
