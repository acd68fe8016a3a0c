"""FPN levels are identified by stride, never by list position: helpers for that."""
from typing import Dict, List, Sequence

import torch
from detectron2.layers import ShapeSpec
from torch import Tensor

__all__ = ["shapes_by_stride", "by_stride", "select_strides", "assign_box_levels"]


def shapes_by_stride(backbone) -> Dict[int, ShapeSpec]:
    """A backbone's output shapes keyed by stride."""
    return {s.stride: s for s in backbone.output_shape().values()}


def by_stride(backbone, features: Dict[str, Tensor]) -> Dict[int, Tensor]:
    """Re-key a backbone's name-keyed outputs ("p2", ...) by stride."""
    shapes = backbone.output_shape()
    return {shapes[name].stride: x for name, x in features.items()}


def select_strides(
    requested, student_shapes: Dict[int, ShapeSpec], teacher_shapes: Dict[int, ShapeSpec], key: str
) -> List[int]:
    """The strides to distil: ``requested`` (a config list, named ``key`` in errors) or every
    stride both models have, ascending."""
    common = sorted(set(student_shapes) & set(teacher_shapes))
    if not common:
        raise ValueError(
            f"student strides {sorted(student_shapes)} and teacher strides "
            f"{sorted(teacher_shapes)} have nothing in common; feature distillation needs "
            "at least one shared FPN stride"
        )
    if not requested:
        return common
    missing = [s for s in requested if s not in common]
    if missing:
        raise ValueError(
            f"{key} asks for strides {missing}, which student and teacher do not both "
            f"have; shared strides are {common}"
        )
    return sorted(int(s) for s in requested)


def assign_box_levels(boxes: Tensor, level_strides: Sequence[int], canonical: float = 56.0) -> Tensor:
    """The FPN level of each box, as the GK authors assign it, returned as a stride.

    ``i = floor(log2(sqrt((w + 1) * (h + 1)) / canonical + 1e-6))``, clamped to
    ``[0, L - 1]``, is an index into the detector's own level list ``level_strides``
    (ascending): with Faster R-CNN's ``[4, 8, 16, 32, 64]`` a box with i = 1 goes to stride
    8, with RetinaNet's ``[8, 16, 32, 64, 128]`` to stride 16.

    Args:
        boxes (Tensor): (M, 4) XYXY boxes in input-image pixels.
        level_strides (sequence of int): the detector's FPN strides (any order; sorted here).
        canonical (float): box side that maps to level index 0 up to twice it (56 in the
            reference).

    Returns:
        Tensor: (M,) int64 strides on ``boxes``' device.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (M, 4) XYXY, got shape {tuple(boxes.shape)}")
    levels = sorted(int(s) for s in level_strides)
    if not levels:
        raise ValueError("assign_box_levels needs at least one stride")
    b = boxes.to(torch.float64)
    w = (b[:, 2] - b[:, 0]).clamp_min(0) + 1
    h = (b[:, 3] - b[:, 1]).clamp_min(0) + 1
    index = torch.floor(torch.log2(torch.sqrt(w * h) / canonical + 1e-6)).clamp(0, len(levels) - 1).long()
    return torch.tensor(levels, device=boxes.device)[index]
