"""Loss pieces shared by several heads. Inputs may be fp16 under AMP; losses are fp32."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


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


def paired_class_logits(ctx) -> Tuple[Tensor, Tensor]:
    """Both models' class logits on the same rows: the student's sampled RoIs (R-CNN, C+1
    classes) or the positive anchors (RetinaNet, C classes), as (R, K) student and teacher."""
    if ctx.proposals is not None:
        return ctx.student_roi_logits, ctx.teacher_roi_logits
    pos = ctx.positive_anchors
    student = torch.cat([ctx.student_cls_logits[s] for s in sorted(ctx.student_cls_logits)], dim=1)
    teacher = torch.cat([ctx.teacher_cls_logits[s] for s in sorted(ctx.teacher_cls_logits)], dim=1)
    return student[pos], teacher[pos]
