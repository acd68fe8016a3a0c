"""The build-time check that a student-teacher pair can give every head what it reads."""
from typing import Dict, List

import torch
from torch import nn

from ..structures import REQUIREMENTS, requirement_capability
from .kinds import DetectorKind

# What of the teacher runs for each requirement (reported by the step-time benchmark).
TEACHER_PARTS = {
    "teacher.images": "preprocessing",
    "teacher.features": "backbone",
    "teacher.dense": "backbone + dense head",
    "teacher.rpn": "backbone + RPN",
    "teacher.box_head": "backbone + box head",
    "teacher.head_tower": "backbone + dense head",
    "teacher.cross_head": "dense head on the student's tower",
}


def teacher_parts(requires) -> List[str]:
    """The parts of the teacher a set of requirements runs, e.g. ["backbone", "box head"]."""
    parts = []
    for key in sorted(requires):
        for part in TEACHER_PARTS.get(key, "").split(" + "):
            if part and part not in parts:
                parts.append(part)
    return parts


def check_requirements(heads: Dict[str, nn.Module], student: nn.Module, student_kind: DetectorKind,
                       teacher: nn.Module, teacher_kind: DetectorKind) -> None:
    """Raise, naming the head and the key, if a head requires something unknown or something
    the pair cannot supply."""
    models = {"student": (student, student_kind), "teacher": (teacher, teacher_kind)}
    for name, head in heads.items():
        for key in sorted(head.requires):
            if key not in REQUIREMENTS:
                raise ValueError(
                    f"distillation head '{name}' requires '{key}', which is not a context key; "
                    f"known keys: {', '.join(sorted(REQUIREMENTS))}"
                )
            side, capability = requirement_capability(key)
            if side in models:
                model, kind = models[side]
                if capability not in kind.capabilities:
                    fix = "a teacher of the student's kind" if side == "teacher" else "another student"
                    raise ValueError(
                        f"distillation head '{name}' requires '{key}' ({REQUIREMENTS[key]}), but "
                        f"the {side} {type(model).__name__} is {kind.describe}, which has no "
                        f"'{capability}'. Use a head this pair supports (e.g. fitnet or pkd for "
                        f"any pair), or {fix}{_hint(head)}"
                    )
            elif key == "paired_anchors":
                _check_same_anchors(name, head, student, student_kind, teacher, teacher_kind)


def _hint(head) -> str:
    hint = getattr(head, "requirement_hint", "")
    return f"; or {hint}" if hint else ""


def _check_same_anchors(head_name: str, head, student, student_kind, teacher, teacher_kind) -> None:
    if student_kind is not teacher_kind:
        raise ValueError(
            f"distillation head '{head_name}' pairs student and teacher anchors one to one, so "
            f"both must be of one kind; the student is {student_kind.describe}, the teacher "
            f"{teacher_kind.describe}. Use a feature head (e.g. fitnet) for this pair{_hint(head)}"
        )
    s_gen, t_gen = student_kind.anchor_generator(student), teacher_kind.anchor_generator(teacher)
    same = list(s_gen.strides) == list(t_gen.strides) and all(
        a.shape == b.shape and torch.allclose(a.cpu(), b.cpu())
        for a, b in zip(s_gen.cell_anchors, t_gen.cell_anchors)
    )
    if not same:
        raise ValueError(
            f"distillation head '{head_name}' pairs student and teacher anchors one to one, "
            "but their anchor generators differ (MODEL.ANCHOR_GENERATOR sizes, aspect "
            "ratios or the FPN levels used); give both models the same anchors"
        )
