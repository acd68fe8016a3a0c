"""RKD: relational distillation among instance embeddings (docs/METHODS.md section 5), and
its GK variant whose relations are the instance-to-prototype rows (GK paper, Table 4)."""
from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from torch import Tensor

from ..prototypes.instance_features import instance_features
from .base import DistillHead
from .registry import DISTILL_HEAD_REGISTRY
from .robust_weights import StepInstances, global_relation_loss, step_instances


def _pairwise_distances(x: Tensor) -> Tensor:
    """(M, M) Euclidean distances, 0 on the diagonal, with finite gradients there."""
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(dim=-1)
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    return sq.clamp(min=1e-12).sqrt().masked_fill(eye, 0.0)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber(d_s / mu_s, d_t / mu_t) averaged over the ordered pairs of distinct instances,
    mu the mean distance over those pairs (RKD's distance-wise loss, Park et al. 2019).

    Args:
        student, teacher (Tensor): (M, D_s), (M, D_t) embeddings of the same M >= 2 instances.
    """
    m = len(student)
    off = ~torch.eye(m, dtype=torch.bool, device=student.device)
    d_s = _pairwise_distances(student.float())[off]
    with torch.no_grad():
        d_t = _pairwise_distances(teacher.float())[off]
        d_t = d_t / d_t.mean().clamp(min=1e-12)
    d_s = d_s / d_s.mean().clamp(min=1e-12)
    return F.smooth_l1_loss(d_s, d_t, beta=1.0, reduction="mean")


def _angles(x: Tensor) -> Tensor:
    """(M, M, M): entry [j, i, k] = cos of the angle at vertex j between x_i and x_k."""
    e = F.normalize(x[None, :, :] - x[:, None, :], dim=-1)  # e[j, i] = unit(x_i - x_j)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Huber between the cosines of the angles ``<x_i - x_j, x_k - x_j>`` of the student and
    the teacher embeddings, averaged over the triplets of distinct instances (RKD's
    angle-wise loss).

    Args:
        student, teacher (Tensor): (M, D_s), (M, D_t) embeddings of the same M >= 3 instances.
    """
    m = len(student)
    idx = torch.arange(m, device=student.device)
    distinct = (
        (idx[:, None, None] != idx[None, :, None])
        & (idx[:, None, None] != idx[None, None, :])
        & (idx[None, :, None] != idx[None, None, :])
    )
    a_s = _angles(student.float())[distinct]
    with torch.no_grad():
        a_t = _angles(teacher.float())[distinct]
    return F.smooth_l1_loss(a_s, a_t, beta=1.0, reduction="mean")


def instance_embeddings(ctx, instances: StepInstances, stride: int):
    """(index, f_s, f_t) of the instances assigned to ``stride``: the mean of each model's map
    over the cells each box covers (:func:`d2kd.prototypes.instance_features`), reused from
    the step's robust-weight computation when that already pooled them."""
    if stride in instances.features:
        return instances.features[stride]
    index = (instances.stride == stride).nonzero().squeeze(1)
    boxes, batch = instances.boxes[index], instances.batch[index]
    f_s = instance_features(ctx.student_features[stride], boxes, batch, stride)
    with torch.no_grad():
        f_t = instance_features(ctx.teacher_features[stride], boxes, batch, stride)
    return index, f_s, f_t


@DISTILL_HEAD_REGISTRY.register()
class RKDHead(DistillHead):
    """RKD on the GT instances of the batch, per stride (each GT box at the level the GK
    authors' rule assigns it; its embedding is its instance feature there), summed over
    strides:

    - ``loss_distill_rkd_distance``: ``DISTANCE_WEIGHT * rkd_distance_loss`` (>= 2 instances);
    - ``loss_distill_rkd_angle``: ``ANGLE_WEIGHT * rkd_angle_loss`` (>= 3 instances).

    With ``L2_NORM`` (the default, as mmrazor's RKD whose weights 25 / 50 these are) the
    embeddings are L2-normalised first.

    With ``GLOBAL`` both are replaced by ``loss_distill_rkd_global``: GK's global term, the
    smooth-L1 between the robust-weighted rows of cosines of each instance to every
    prototype, student vs teacher space (0 until the prototype bank is first built). No
    adapter is needed: relations do not depend on the channel count.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.RKD``, this head's keys and their defaults."""
        _C = cfg
        # RKD: distance and angle relations among the GT instance embeddings at each level.
        _C.DISTILL.RKD = CN()
        _C.DISTILL.RKD.DISTANCE_WEIGHT = 25.0
        _C.DISTILL.RKD.ANGLE_WEIGHT = 50.0
        # L2-normalise the instance embeddings before relating them (mmrazor's RKD default).
        _C.DISTILL.RKD.L2_NORM = True
        # Replace the instance relations by GK's robust-weighted instance-to-prototype rows
        # (GK paper, Table 4); needs the prototypes of DISTILL.PROTOTYPES.
        _C.DISTILL.RKD.GLOBAL = False
        _C.DISTILL.RKD.GLOBAL_WEIGHT = 1.0
        _C.DISTILL.RKD.STRIDES = []
        _C.DISTILL.RKD.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.RKD
        self.strides = self.select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.RKD.STRIDES")
        self.distance_weight = node.DISTANCE_WEIGHT
        self.angle_weight = node.ANGLE_WEIGHT
        self.l2_norm = bool(node.L2_NORM)
        self.global_relations = bool(node.GLOBAL)
        self.global_weight = node.GLOBAL_WEIGHT
        requires = {"student.features", "teacher.features"}
        if self.global_relations:
            requires.add("prototypes")
        self.requires = frozenset(requires)

    def forward(self, ctx) -> Dict[str, Tensor]:
        decay = self.decay_factor(ctx)
        instances = step_instances(ctx, "gt")
        zero = ctx.zero_loss()
        if self.global_relations:
            loss = global_relation_loss(ctx, instances, self.strides)
            return {self.loss_key("global"): loss * (self.global_weight * decay)}
        loss_d, loss_a = zero, zero
        for s in self.strides:
            _, f_s, f_t = instance_embeddings(ctx, instances, s)
            if self.l2_norm:
                f_s, f_t = F.normalize(f_s.float(), dim=1), F.normalize(f_t.float(), dim=1)
            if len(f_s) >= 2:
                loss_d = loss_d + rkd_distance_loss(f_s, f_t)
            if len(f_s) >= 3:
                loss_a = loss_a + rkd_angle_loss(f_s, f_t)
        return {
            self.loss_key("distance"): loss_d * (self.distance_weight * decay),
            self.loss_key("angle"): loss_a * (self.angle_weight * decay),
        }
