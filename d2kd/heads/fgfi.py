"""FGFI: fine-grained feature imitation on near-object anchor cells (docs/METHODS.md section 5)."""
from typing import Dict, Sequence, Tuple

import torch
from detectron2.config import CfgNode as CN
from torch import Tensor

from ..structures import AnchorMatches, assign_box_levels
from .adapters import ADAPTER_INITS, StrideAdapters
from .base import DistillHead
from .functional import crop_to_common
from .registry import DISTILL_HEAD_REGISTRY

MAX_IOU_OVER = ("all_levels", "each_level", "assigned_level")


def imitation_masks(
    anchors: AnchorMatches,
    gt_boxes: Sequence[Tensor],
    sizes: Dict[int, Tuple[int, int]],
    threshold: float = 0.5,
    max_iou_over: str = "all_levels",
) -> Dict[int, Tensor]:
    """FGFI's imitation mask I at each stride of ``sizes``.

    An anchor is near a GT box when their IoU exceeds ``threshold`` (psi) times the box's
    best anchor IoU; a cell is in I when any of its A anchors is near any GT box. The paper
    has one feature map and takes the best over all its anchors; for an FPN the best is
    taken over (``max_iou_over``):

    - ``"all_levels"``: every anchor of the detector, so a box marks cells only on the levels
      whose anchors fit it (the paper's "all anchors" taken literally);
    - ``"each_level"``: each level's anchors separately, so every box marks cells on every
      level, however badly that level's anchors fit it (coarse levels end up fully masked);
    - ``"assigned_level"``: the anchors of the one level the GK / DeFeat authors' rule assigns
      the box to (:func:`d2kd.structures.assign_box_levels` over the anchor levels), as the
      FGFI baseline of their code base does.

    Args:
        anchors: the student's anchors matched to the GT boxes; ``anchors.ious[i]`` is
            (G_i, R) over all levels, each level in detectron2's (H, W, A) row-major order.
        gt_boxes: per image, (G_i, 4) XYXY GT boxes (read by ``"assigned_level"`` only).
        sizes: stride -> (H, W) of that level's anchor grid.
        threshold: psi.
        max_iou_over: see above.

    Returns:
        dict[int, Tensor]: stride -> (N, H, W) bool.
    """
    if max_iou_over not in MAX_IOU_OVER:
        raise ValueError(f"max_iou_over must be one of {MAX_IOU_OVER}, got '{max_iou_over}'")
    lengths = [len(anchors.anchors[s]) for s in anchors.strides]
    for s, (h, w) in sizes.items():
        if s not in anchors.strides:
            raise ValueError(f"FGFI distils stride {s}, where the student has no anchors ({anchors.strides})")
        level = anchors.strides.index(s)
        if lengths[level] != h * w * anchors.num_anchors[level]:
            raise ValueError(
                f"stride {s}: {lengths[level]} anchors do not tile a {h}x{w} map with "
                f"{anchors.num_anchors[level]} per cell"
            )
    masks = {s: [] for s in sizes}
    for i, iou in enumerate(anchors.ious):  # (G, R)
        if max_iou_over == "all_levels" and iou.shape[0]:
            near = torch.split(iou > threshold * iou.max(dim=1, keepdim=True).values, lengths, dim=1)
        else:
            near = torch.split(iou, lengths, dim=1)
            if max_iou_over == "assigned_level" and iou.shape[0]:
                assigned = assign_box_levels(gt_boxes[i], anchors.strides)
                near = [x[assigned == s] for x, s in zip(near, anchors.strides)]
            near = [x > threshold * x.max(dim=1, keepdim=True).values if x.shape[0] else x.bool() for x in near]
        for s, (h, w) in sizes.items():
            level = anchors.strides.index(s)
            cells = near[level].any(dim=0).view(h, w, anchors.num_anchors[level]).any(dim=2)
            masks[s].append(cells)
    return {s: torch.stack(m) for s, m in masks.items()}


@DISTILL_HEAD_REGISTRY.register()
class FGFIHead(DistillHead):
    """``WEIGHT / (2 sum(I)) * sum(I * (A(F_s) - F_t)^2)`` per stride (sum over channels and
    the masked cells, as the paper), summed over strides; I from :func:`imitation_masks`.

    The adapter (3x3 conv + ReLU by default) is always present. Anchors are the student's
    own: RPN anchors for a two-stage student, the dense head's for a RetinaNet student. The
    term is 0 before ``START_ITER`` (the paper: 400 iterations; the teacher does not run then,
    and the adapter stays in the graph). Produces ``loss_distill_fgfi``.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.FGFI``, this head's keys and their defaults."""
        _C = cfg
        # FGFI: feature imitation on the cells of near-object anchors (docs/METHODS.md section 5).
        _C.DISTILL.FGFI = CN()
        # lambda of lambda / (2 sum(I)) * sum(I (A(F_s) - F_t)^2) (a sum over channels, as the paper).
        _C.DISTILL.FGFI.WEIGHT = 0.01
        # psi: an anchor is near a GT when its IoU exceeds psi times that GT's best anchor IoU.
        _C.DISTILL.FGFI.THRESHOLD = 0.5
        # What psi's "best anchor IoU" of a GT is taken over: "all_levels" (every anchor, the paper's
        # rule read literally), "each_level" (per level), "assigned_level" (the DeFeat/GK code base).
        _C.DISTILL.FGFI.MAX_IOU_OVER = "all_levels"
        # Iterations at the start of training without the FGFI term (the paper: 400).
        _C.DISTILL.FGFI.START_ITER = 400
        _C.DISTILL.FGFI.STRIDES = []
        # Student-side adapter, always present (the paper: 3x3 conv + ReLU).
        _C.DISTILL.FGFI.ADAPTER_KERNEL = 3
        _C.DISTILL.FGFI.ADAPTER_RELU = True
        # Adapter init: "msra" (d2kd's adapters) or "trunc_normal" (FGFI's code: std 1e-4, within 2 std).
        _C.DISTILL.FGFI.ADAPTER_INIT = "msra"
        _C.DISTILL.FGFI.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.FGFI
        self.weight = node.WEIGHT
        self.threshold = node.THRESHOLD
        self.max_iou_over = self.choice(node.MAX_IOU_OVER, MAX_IOU_OVER, "DISTILL.FGFI.MAX_IOU_OVER")
        self.start_iter = node.START_ITER
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.FGFI.STRIDES")
        self.adapters = StrideAdapters(
            self.strides, student_shapes, teacher_shapes, "always", node.ADAPTER_KERNEL, node.ADAPTER_RELU,
            init=self.choice(node.ADAPTER_INIT, ADAPTER_INITS, "DISTILL.FGFI.ADAPTER_INIT"),
        )
        self.requires = frozenset({"student.features", "teacher.features", "student.anchors"})

    def forward(self, ctx) -> Dict[str, Tensor]:
        if ctx.iteration < self.start_iter:
            # a zero term over the adapter keeps it in the graph (DDP) without running the teacher
            zero = ctx.zero_loss()
            return {self.loss_key(): sum((p.sum() for p in self.adapters.parameters()), zero) * 0.0}
        sizes = {s: tuple(ctx.student_features[s].shape[-2:]) for s in self.strides}
        gt_boxes = [g.gt_boxes.tensor for g in ctx.gt_instances]
        masks = imitation_masks(ctx.anchors, gt_boxes, sizes, self.threshold, self.max_iou_over)
        total = ctx.zero_loss()
        for s in self.strides:
            student, teacher = crop_to_common(self.adapters(s, ctx.student_features[s]), ctx.teacher_features[s])
            mask = masks[s][:, : student.shape[-2], : student.shape[-1]].float()
            sq = ((student.float() - teacher.float()) ** 2).sum(dim=1)  # (N, H, W), summed over C
            total = total + (sq * mask).sum() / (2 * mask.sum()).clamp(min=1.0)
        return {self.loss_key(): total * (self.weight * self.decay_factor(ctx))}
