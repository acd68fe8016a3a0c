"""Rank Mimicking (Li et al., AAAI 2022; docs/METHODS.md section 4)."""
from typing import Dict

import torch
from detectron2.config import CfgNode as CN
from torch import Tensor

from ..structures import STUDENT, TEACHER
from .base import DistillHead
from .functional import SCORE_KINDS
from .registry import DISTILL_HEAD_REGISTRY


def segment_log_softmax(x: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """``log_softmax`` of ``x`` within each segment (rows sharing a ``segment`` id).

    Args:
        x (Tensor): (M,) values.
        segment (Tensor): (M,) int64 ids in ``[0, num_segments)``.
    Returns:
        Tensor: (M,).
    """
    # the per-segment maximum only keeps exp() in range; softmax does not depend on it
    peak = x.detach().new_full((num_segments,), float("-inf")).scatter_reduce(
        0, segment, x.detach(), reduce="amax", include_self=True
    )
    shifted = x - peak[segment]
    total = shifted.new_zeros(num_segments).index_add(0, segment, shifted.exp())
    return shifted - total.log()[segment]


def rank_mimic_loss(student: Tensor, teacher: Tensor, segment: Tensor) -> Tensor:
    """Mean over segments of ``KL(softmax(t) || softmax(s))`` within each segment.

    Args:
        student, teacher (Tensor): (M,) the two models' scores of the same M candidates.
        segment (Tensor): (M,) the group (GT box) of each candidate, any int64 ids.
    Returns:
        Tensor: scalar, 0 (in the graph) without candidates. Segments are averaged with equal
        weight; a one-candidate segment contributes 0.
    """
    if student.numel() == 0:
        return student.sum() * 0.0
    ids, segment = torch.unique(segment, return_inverse=True)
    log_s = segment_log_softmax(student.float(), segment, len(ids))
    log_t = segment_log_softmax(teacher.float(), segment, len(ids))
    kl = log_t.exp() * (log_t - log_s)
    return kl.new_zeros(len(ids)).index_add(0, segment, kl).mean()


@DISTILL_HEAD_REGISTRY.register()
class RankMimicHead(DistillHead):
    """Rank Mimicking: the student ranks each GT box's candidate anchors as the teacher does.

    Per GT box j, its candidates are the anchors the student's own assignment makes positive
    for j (``ctx.anchors.gt_index``). At those anchors, both models' scores for j's class
    (sigmoid probabilities, or logits with ``SCORES "logits"``), divided by ``TEMPERATURE``,
    are soft-maxed over the candidates, and the loss is ``KL(softmax(t) || softmax(s))``, averaged over the GT boxes
    that have candidates. The candidates keep their anchor correspondence (no sorting).
    Vectorised over all GT boxes of the batch. Produces ``loss_distill_rank_mimic``.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.RANK_MIMIC``, this head's keys and their defaults."""
        _C = cfg
        # Rank Mimicking (docs/METHODS.md section 4): per GT box, KL(teacher || student) of the softmax
        # over its positive anchors of their scores for its class (dense students).
        _C.DISTILL.RANK_MIMIC = CN()
        _C.DISTILL.RANK_MIMIC.WEIGHT = 4.0
        # Scores softmaxed over the candidates: "sigmoid" (class probabilities) or "logits".
        _C.DISTILL.RANK_MIMIC.SCORES = "sigmoid"
        # T of softmax(score / T) over the candidates (the spec: 1); < 1 sharpens sigmoid scores.
        _C.DISTILL.RANK_MIMIC.TEMPERATURE = 1.0
        _C.DISTILL.RANK_MIMIC.DECAY = False

    name = "rank_mimic"

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.RANK_MIMIC
        self.weight = node.WEIGHT
        self.sigmoid = self.choice(node.SCORES, SCORE_KINDS, "DISTILL.RANK_MIMIC.SCORES") == "sigmoid"
        self.temperature = node.TEMPERATURE
        self.requires = frozenset({"student.dense", "teacher.dense", "student.anchors", "paired_anchors"})

    def forward(self, ctx) -> Dict[str, Tensor]:
        anchors = ctx.anchors
        gt_index = anchors.gt_index  # (N, R), -1 unless positive
        n_idx, r_idx = (gt_index >= 0).nonzero(as_tuple=True)
        classes = anchors.labels[n_idx, r_idx]
        student = ctx.dense(STUDENT).concat(0)[n_idx, r_idx, classes]
        teacher = ctx.dense(TEACHER).concat(0)[n_idx, r_idx, classes]
        if self.sigmoid:
            student, teacher = student.float().sigmoid(), teacher.float().sigmoid()
        # a batch-wide id per GT box: its image's offset plus its index in the image
        sizes = torch.tensor([len(g) for g in ctx.gt_instances], device=gt_index.device)
        offsets = torch.cumsum(sizes, 0) - sizes
        segment = offsets[n_idx] + gt_index[n_idx, r_idx]
        t = self.temperature
        loss = rank_mimic_loss(student.float() / t, teacher.float() / t, segment)
        return {self.loss_key(): loss * (self.weight * self.decay_factor(ctx))}
