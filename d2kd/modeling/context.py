"""What a distillation head sees in one training step."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from detectron2.structures import Boxes, Instances


@dataclass
class DistillContext:
    """Both models' intermediate results on one batch, handed to every distillation head.

    Features are keyed by stride (4, 8, ... 128), never by list position, so a heterogeneous
    pair (R-CNN p2-p6, RetinaNet p3-p7) is paired correctly. Teacher tensors are computed under
    ``torch.no_grad()``. Fields a meta-architecture does not produce stay ``None``; a head that
    needs them declares it in ``DistillHead.requires`` and is rejected at build time otherwise.

    Attributes:
        student_features (dict[int, Tensor]): stride -> (N, C_s, H, W).
        teacher_features (dict[int, Tensor]): stride -> (N, C_t, H', W').
        gt_instances (list[Instances]): per image, ``gt_boxes`` / ``gt_classes`` in input pixels.
        image_sizes (list[tuple[int, int]]): (h, w) of each unpadded input image.
        num_classes (int): C, number of foreground classes (same for both models).
        iteration (int): the trainer's current iteration.
        max_iter (int): the schedule's length (for loss-weight schedules).

        proposals (list[Instances]): R-CNN only. The student's sampled RoIs with
            ``proposal_boxes``, ``gt_classes`` (C = background) and ``gt_boxes``.
        student_roi_logits, teacher_roi_logits (Tensor): (R, C+1) on those same RoIs.
        student_roi_deltas, teacher_roi_deltas (Tensor): (R, 4*C) or (R, 4) box deltas.

        anchors (dict[int, Boxes]): RetinaNet only. stride -> the anchors of that level.
        anchor_gt_labels (Tensor): (N, R) over all levels: class, C for background, -1 ignored.
        anchor_gt_index (Tensor): (N, R) index of the matched GT in its image, -1 when not
            foreground.
        student_cls_logits, teacher_cls_logits (dict[int, Tensor]): stride ->
            (N, H*W*A, C) class logits per anchor.
        student_box_reg, teacher_box_reg (dict[int, Tensor]): stride -> (N, H*W*A, B), the box
            branch output in whatever form the head produces (B = 4 for deltas).

        prototype_bank: the model's ``PrototypeBank`` when prototypes are enabled, else None.
        cache (dict): per-step memo shared by heads (e.g. robust weights computed once).
    """

    student_features: Dict[int, Tensor]
    teacher_features: Dict[int, Tensor]
    gt_instances: List[Instances]
    image_sizes: List[tuple]
    num_classes: int
    iteration: int = 0
    max_iter: int = 1

    proposals: Optional[List[Instances]] = None
    student_roi_logits: Optional[Tensor] = None
    teacher_roi_logits: Optional[Tensor] = None
    student_roi_deltas: Optional[Tensor] = None
    teacher_roi_deltas: Optional[Tensor] = None

    anchors: Optional[Dict[int, Boxes]] = None
    anchor_gt_labels: Optional[Tensor] = None
    anchor_gt_index: Optional[Tensor] = None
    student_cls_logits: Optional[Dict[int, Tensor]] = None
    teacher_cls_logits: Optional[Dict[int, Tensor]] = None
    student_box_reg: Optional[Dict[int, Tensor]] = None
    teacher_box_reg: Optional[Dict[int, Tensor]] = None

    prototype_bank: Any = None
    cache: Dict[str, Any] = field(default_factory=dict)

    @property
    def common_strides(self) -> List[int]:
        """Strides both models produce, ascending."""
        return sorted(set(self.student_features) & set(self.teacher_features))

    @property
    def positive_anchors(self) -> Tensor:
        """(N, R) bool: anchors matched to a GT (neither background nor ignored)."""
        return (self.anchor_gt_labels >= 0) & (self.anchor_gt_labels != self.num_classes)

    @property
    def device(self) -> torch.device:
        return next(iter(self.student_features.values())).device
