"""CrossKD (Wang et al., CVPR 2024, "CrossKD: Cross-Head Knowledge Distillation for Object
Detection") for dense students (RetinaNet, GFL): the student's head tower output at layer i is
run through the teacher's head from layer i on, and those cross-head predictions mimic the
teacher's own predictions. The student's own head keeps only the detection losses.

Checked against the authors' release (jbwang1997/CrossKD, commit 87e156a, mmdetection 3.0:
``CrossKDRetinaNet``, ``CrossKDGFL``, ``KDQualityFocalLoss``, ``KnowledgeDistillationKLDivLoss``,
``configs/crosskd/``); the differences are listed in the README's comparison table.
"""
from typing import Dict, List

import torch
from detectron2.config import CfgNode as CN
from fvcore.nn import giou_loss
from fvcore.nn.weight_init import c2_msra_fill
from torch import Tensor, nn

from ..structures import STUDENT, TEACHER, HeadTower
from .base import DistillHead
from .bckd import DenseBoxDecoder, binary_kd_loss, positive_count, student_capabilities
from .functional import kl_per_row
from .registry import DISTILL_HEAD_REGISTRY

BOX_LOSSES = ("auto", "giou", "kl")


def align_scale(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """The student's map standardised per channel (over batch and positions) and given the
    teacher's per-channel mean and standard deviation (unbiased, as torch.std), as the
    authors' ``align_scale``.

    Args:
        student (Tensor): (N, C, H, W), in the graph.
        teacher (Tensor): (N, C, H, W), the teacher's map at the same layer (no grad).
    Returns:
        Tensor: (N, C, H, W).
    """
    dims = (0, 2, 3)
    s_mean, s_std = student.mean(dim=dims, keepdim=True), student.std(dim=dims, keepdim=True)
    t_mean, t_std = teacher.mean(dim=dims, keepdim=True), teacher.std(dim=dims, keepdim=True)
    return (student - s_mean) / (s_std + eps) * t_std + t_mean


@DISTILL_HEAD_REGISTRY.register()
class CrossKDHead(DistillHead):
    """CrossKD's cross-head prediction mimicking.

    The cross head: the student's tower output at ``LAYER`` (per branch and level; 1x1 conv to
    the teacher's width only when the widths differ), aligned to the teacher's tower output
    there (:func:`align_scale`, ``ALIGN``), run through the teacher's head from that layer on
    (``ctx.teacher_head_from``: frozen, gradients flow back into the student's tower). Then,
    over every anchor the detector does not ignore:

    - ``loss_distill_crosskd_cls`` (``CLS_WEIGHT`` 1): ``binary_kd_loss`` (the authors'
      ``KDQualityFocalLoss``, beta 1) of the cross class logits against the teacher's, summed,
      divided by the positives (per image at least 1; GFL: averaged over workers);
    - ``loss_distill_crosskd_box``: each anchor weighted by the teacher's largest class score
      (sigmoid of its largest logit). ``giou`` (RetinaNet, ``GIOU_WEIGHT`` 1): GIoU loss of the
      decoded cross boxes against the teacher's, summed, divided by the positives. ``kl`` (GFL,
      ``KL_WEIGHT`` 4): per edge ``T^2 KL`` of the bin distributions (T ``KL_TEMPERATURE`` 1,
      summed over bins), mean over the 4 edges, weighted sum divided by the sum of the weights.
    """

    @classmethod
    def add_config(cls, cfg):
        """Add ``cfg.DISTILL.CROSSKD``, this head's keys and their defaults."""
        _C = cfg
        # CrossKD (CVPR 2024): the student's head tower output at LAYER runs through the teacher's
        # head from there on; those cross-head predictions mimic the teacher's predictions.
        _C.DISTILL.CROSSKD = CN()
        # Tower layer of the cut (the authors' reused_teacher_head_idx, 3 of 4 convs): the student's
        # output of conv block LAYER before its activation (0: the FPN feature) enters the teacher's
        # head, whose block LAYER activation, blocks LAYER+1.. and predictors then run.
        _C.DISTILL.CROSSKD.LAYER = 3
        # Standardise the student's map per channel and give it the teacher's mean and std there.
        _C.DISTILL.CROSSKD.ALIGN = True
        # Class term: BCE(p_cross, p_t) * |p_cross - p_t|^beta (the authors' KDQualityFocalLoss).
        _C.DISTILL.CROSSKD.CLS_WEIGHT = 1.0
        _C.DISTILL.CROSSKD.CLS_BETA = 1.0
        # Box term: "giou" (decoded boxes), "kl" (per-edge distributions, GFL), or "auto": kl for
        # a distribution box branch, giou otherwise (the authors' choice per detector).
        _C.DISTILL.CROSSKD.BOX_LOSS = "auto"
        # Weight of the GIoU box term (the authors' RetinaNet: 1.0).
        _C.DISTILL.CROSSKD.GIOU_WEIGHT = 1.0
        # Weight and temperature of the per-edge KL box term (the authors' GFL: 4.0, T 1).
        _C.DISTILL.CROSSKD.KL_WEIGHT = 4.0
        _C.DISTILL.CROSSKD.KL_TEMPERATURE = 1.0
        # Follow DISTILL.SCHEDULE.LINEAR_DECAY (the authors do not decay).
        _C.DISTILL.CROSSKD.DECAY = False

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        node = cfg.DISTILL.CROSSKD
        self.layer = int(node.LAYER)
        self.tower_layers = frozenset({self.layer})
        self.align = bool(node.ALIGN)
        self.cls_weight, self.beta = node.CLS_WEIGHT, node.CLS_BETA
        if self.beta < 0:
            raise ValueError(f"DISTILL.CROSSKD.CLS_BETA must be >= 0; got {self.beta}")
        distribution = "box_distribution" in student_capabilities(cfg)
        box_loss = self.choice(node.BOX_LOSS, BOX_LOSSES, "DISTILL.CROSSKD.BOX_LOSS")
        self.box_loss = ("kl" if distribution else "giou") if box_loss == "auto" else box_loss
        if self.box_loss == "kl" and not distribution:
            raise ValueError("DISTILL.CROSSKD.BOX_LOSS 'kl' compares per-edge box distributions, which "
                             f"a {cfg.MODEL.META_ARCHITECTURE} student does not predict; use 'giou' or 'auto'")
        self.box_weight = node.KL_WEIGHT if self.box_loss == "kl" else node.GIOU_WEIGHT
        self.temperature = node.KL_TEMPERATURE
        self.decode = DenseBoxDecoder(cfg, distribution)
        self.over_workers = distribution  # as each detector's own loss normaliser in the authors' code
        # The towers are as wide as the FPN in detectron2's RetinaNetHead and d2kd's GFLHead.
        self.student_width = next(iter(student_shapes.values())).channels
        self.teacher_width = next(iter(teacher_shapes.values())).channels
        # One 1x1 conv per tower (class, box), shared over levels, only when the widths differ: the
        # authors' pairs share the head width, the built-in data's do not.
        self.adapters = nn.ModuleList()
        if self.student_width != self.teacher_width:
            for _ in range(2):
                conv = nn.Conv2d(self.student_width, self.teacher_width, kernel_size=1)
                c2_msra_fill(conv)
                self.adapters.append(conv)
        self.requires = frozenset(
            {"student.head_tower", "teacher.cross_head", "teacher.dense", "student.anchors", "paired_anchors"}
            | ({"teacher.head_tower"} if self.align else set())
            | ({"student.box_distribution", "teacher.box_distribution"} if distribution else set())
        )

    def cross_inputs(self, ctx) -> HeadTower:
        """The student's tower output at the layer, adapted and aligned: what the teacher's head
        runs on."""
        tower_s = ctx.head_tower(STUDENT, self.layer)
        tower_t = ctx.head_tower(TEACHER, self.layer) if self.align else None
        branches: List[Dict[int, Tensor]] = []
        for b, maps in enumerate(tower_s.branches):
            out = {}
            for stride, x in maps.items():
                x = x.float()
                if x.shape[1] != self.student_width:
                    raise ValueError(f"CrossKD was built for a student tower of {self.student_width} "
                                     f"channels (its FPN width); the tower has {x.shape[1]}")
                if len(self.adapters):
                    x = self.adapters[b](x)
                if tower_t is not None:
                    t = tower_t.branches[b][stride].float()
                    if t.shape != x.shape:
                        raise ValueError(f"CrossKD: student tower map {tuple(x.shape)} and teacher's "
                                         f"{tuple(t.shape)} at stride {stride} differ")
                    x = align_scale(x, t)
                out[stride] = x
            branches.append(out)
        return HeadTower(layer=self.layer, strides=tower_s.strides, branches=branches)

    def forward(self, ctx) -> Dict[str, Tensor]:
        cross = ctx.teacher_head_from(self.cross_inputs(ctx))
        teacher = ctx.dense(TEACHER)
        cls_c, cls_t = cross.concat(0).float(), teacher.concat(0).float()  # (N, R, C)
        box_c, box_t = cross.concat(1).float(), teacher.concat(1).float()  # (N, R, K)
        anchors = ctx.anchors
        valid = anchors.labels >= 0
        decay = self.decay_factor(ctx)
        normaliser = positive_count(anchors, self.over_workers)

        loss_cls = binary_kd_loss(cls_c[valid], cls_t[valid], self.beta).sum() / normaliser

        weight = cls_t.amax(dim=-1).sigmoid() * valid  # (N, R), the teacher's confidence
        if self.box_loss == "kl":
            bins = box_c.shape[-1] // 4
            kl = kl_per_row(box_c[valid].reshape(-1, bins), box_t[valid].reshape(-1, bins), self.temperature)
            per_anchor = kl.reshape(-1, 4).mean(dim=1)
            loss_box = (per_anchor * weight[valid]).sum() / weight[valid].sum().clamp(min=1e-6)
        else:
            rows = weight > 0
            boxes_c = self.decode(box_c, anchors)
            with torch.no_grad():
                boxes_t = self.decode(box_t, anchors)
            giou = giou_loss(boxes_c[rows], boxes_t[rows], reduction="none", eps=1e-7)
            loss_box = (giou * weight[rows]).sum() / normaliser + boxes_c.sum() * 0.0
        return {
            self.loss_key("cls"): loss_cls * (self.cls_weight * decay),
            self.loss_key("box"): loss_box * (self.box_weight * decay),
        }
