"""Loss pieces shared by several heads. Inputs may be fp16 under AMP; losses are fp32."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..structures import STUDENT, TEACHER
from .robust_weights import anchor_robust_weights, roi_robust_weights

# How dense heads compare class scores: sigmoid probabilities or raw logits.
SCORE_KINDS = ("sigmoid", "logits")


def kl_per_row(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) for each row.

    Args:
        student_logits, teacher_logits (Tensor): (R, K).
    Returns:
        Tensor: (R,), summed over the K classes.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * (t * t)


def crop_to_common(student: Tensor, teacher: Tensor) -> Tuple[Tensor, Tensor]:
    """Crop two maps of the same stride to their common (top-left aligned) size.

    Maps of one stride differ in size only by padding (each model pads the batch to its own
    size divisibility), and padding is at the bottom / right.
    """
    h = min(student.shape[-2], teacher.shape[-2])
    w = min(student.shape[-1], teacher.shape[-1])
    return student[..., :h, :w], teacher[..., :h, :w]


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """mean(w * v) over the rows; 0 (still in the graph) when there are none."""
    return (values * weights).sum() / max(values.numel(), 1)


def paired_class_logits(ctx, two_stage: bool, rows: str = "all", robust: bool = False):
    """Both models' class logits on the same rows, with a weight per row.

    Two-stage pairs: the student's sampled RoIs (C+1 classes), all of them or the
    foreground ones (``rows="positive"``); the teacher's box head runs on exactly those RoIs.
    Dense pairs: the positive anchors (C classes; ``rows`` makes no difference).
    With ``robust`` the weights are GK robust weights (foreground rows: of the RoI itself,
    or of the anchor's matched GT; 1 for the rest), else 1.

    Returns:
        (Tensor, Tensor, Tensor): student (R, K), teacher (R, K), weights (R,).
    """
    if rows not in ("all", "positive"):
        raise ValueError(f"rows must be 'all' or 'positive', got '{rows}'")
    if two_stage:
        rois = ctx.rois
        if rows == "all":
            student, teacher = rois.student_logits, ctx.teacher_roi_outputs[0]
            keep = None
        else:
            keep = rois.foreground
            key = "teacher_positive_roi_logits"
            if key not in ctx.cache:
                boxes = [p.proposal_boxes[p.gt_classes != rois.num_classes] for p in rois.proposals]
                ctx.cache[key] = ctx.teacher_box_head(boxes)[0]
            student, teacher = rois.student_logits[keep], ctx.cache[key]
        if robust:
            weights = roi_robust_weights(ctx)
            weights = weights if keep is None else weights[keep]
        else:
            weights = torch.ones(student.shape[0], device=student.device)
        return student, teacher, weights
    pos = ctx.anchors.positive
    student = ctx.dense(STUDENT).concat(0)[pos]
    teacher = ctx.dense(TEACHER).concat(0)[pos]
    if robust:
        weights = anchor_robust_weights(ctx)[pos]
    else:
        weights = torch.ones(student.shape[0], device=student.device)
    return student, teacher, weights


def class_logit_requirements(two_stage: bool) -> frozenset:
    """What :func:`paired_class_logits` reads, per student kind."""
    if two_stage:
        return frozenset({"student.rois", "teacher.box_head", "student.features", "teacher.features"})
    return frozenset({"student.dense", "teacher.dense", "student.anchors", "paired_anchors",
                      "student.features", "teacher.features"})
