"""What a distillation head sees in one training step.

The :class:`DistillContext` offers both models' intermediate results through cached
accessors: each is computed at most once per step, and only when a head asks for it, so the
teacher runs only as far as the enabled heads need (FitNet: its backbone; KD on R-CNN: plus
its box head; KD on RetinaNet: plus its dense head). A head declares what it reads in
``requires`` (the keys of :data:`REQUIREMENTS`); the model pair is checked against it when
the model is built.

Levels are keyed by stride (4, 8, ... 128), never by list position, so a heterogeneous pair
(R-CNN p2-p6, RetinaNet p3-p7) is paired correctly. Teacher tensors are computed under
``torch.no_grad()``, with one exception: ``teacher_head_from`` (the teacher's dense head run from
a tower layer on given tensors, e.g. the student's, as CrossKD does) keeps the graph of its
inputs, so gradients flow back through the frozen teacher layers into whatever produced them.

This module is a leaf: it defines the data a step offers and the interface a
meta-architecture implements (:class:`StepOutputs`); ``d2kd.modeling`` implements it.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
from detectron2.layers import cat
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor

STUDENT, TEACHER = "student", "teacher"

# The keys a head may list in ``requires``: "<side>.<capability>" plus two pair-level keys.
# The capability after the dot must be offered by that side's detector kind
# (d2kd.modeling.kinds), which the model build checks.
REQUIREMENTS: Dict[str, str] = {
    "student.images": "the student's preprocessed image batch (ImageList)",
    "teacher.images": "the teacher's own preprocessing of the same raw batch (ImageList)",
    "student.features": "the student's FPN features by stride",
    "teacher.features": "the teacher's FPN features by stride (runs the teacher's backbone)",
    "student.dense": "the student's dense-head outputs per level (RetinaNet-like detectors)",
    "teacher.dense": "the teacher's dense-head outputs per level (runs its dense head)",
    "student.box_distribution": "a box branch that predicts a discrete distribution per box edge (GFL)",
    "teacher.box_distribution": "a teacher box branch that predicts a distribution per box edge (GFL)",
    "student.rpn": "the student's RPN anchors, objectness, deltas and proposals (two-stage)",
    "teacher.rpn": "the teacher's RPN outputs on its own features (runs its RPN)",
    "student.rois": "the student's sampled RoIs with labels, matched GT and box-head outputs",
    "teacher.box_head": "the teacher's box head on given boxes, e.g. the student's RoIs",
    "student.anchors": "the student's anchors matched to the GT boxes, with IoUs",
    # A head that requires one of the next three lists the tower layers it reads in its
    # attribute ``tower_layers`` (the model records only those).
    "student.head_tower": "the student's dense-head tower outputs at a layer, per branch and level, "
                          "in the graph (gradients reach the student's tower)",
    "teacher.head_tower": "the teacher's tower outputs at a layer on its own features (its dense-head pass)",
    "teacher.cross_head": "the teacher's dense head from a tower layer on, run on given tensors (e.g. "
                          "the student's tower outputs): frozen parameters, gradients flow to the inputs",
    "paired_anchors": "student and teacher anchors that correspond one to one (same generator)",
    "prototypes": "GK's prototype bank (built and refreshed during training)",
}


def requirement_capability(key: str) -> Tuple[str, str]:
    """``"teacher.dense"`` -> ``("teacher", "dense")``; pair-level keys give ``("pair", key)``."""
    if "." in key:
        side, capability = key.split(".", 1)
        return side, capability
    return "pair", key


@dataclass
class DenseOutputs:
    """One model's dense-head outputs, as its head produced them.

    Attributes:
        strides (list[int]): the levels in the model's own order (its ``head_in_features``),
            which is also the order in which its anchors are concatenated.
        num_anchors (list[int]): A, anchors per cell, per level.
        branches (list[dict[int, Tensor]]): one entry per head output (RetinaNet: class
            logits, box regression; FCOS adds centerness), each stride -> (N, A*K, H, W)
            exactly as detectron2's head returns it (channel index a*K + k).
    """

    strides: List[int]
    num_anchors: List[int]
    branches: List[Dict[int, Tensor]]

    @property
    def cls_maps(self) -> Dict[int, Tensor]:
        """stride -> (N, A*C, H, W) class logits."""
        return self.branches[0]

    @property
    def box_maps(self) -> Dict[int, Tensor]:
        """stride -> (N, A*B, H, W) box outputs (B = 4 for deltas, more for distributions)."""
        return self.branches[1]

    def flat(self, branch: int = 0) -> Dict[int, Tensor]:
        """stride -> (N, H*W*A, K), detectron2's ``permute_to_N_HWA_K`` layout (row
        ``(y*W + x)*A + a``), K read off the tensor."""
        out = {}
        for s, a in zip(self.strides, self.num_anchors):
            x = self.branches[branch][s]
            out[s] = permute_to_N_HWA_K(x, x.shape[1] // a)
        return out

    def concat(self, branch: int = 0) -> Tensor:
        """(N, R, K) over all levels in ``strides`` order: row r is anchor r of the model's
        concatenated anchors (:attr:`AnchorMatches.anchors`)."""
        flat = self.flat(branch)
        return torch.cat([flat[s] for s in self.strides], dim=1)


@dataclass
class HeadTower:
    """One model's dense-head tower outputs at one layer.

    Layer ``i`` of a tower of L conv blocks (conv, norm, activation) is the output of block i
    *before* its activation (its conv, or its norm when the tower has one), ``1 <= i <= L``;
    layer 0 is the head's input (the FPN feature). This is where CrossKD cuts the head
    (its ``reused_teacher_head_idx``); the teacher's head run from layer i applies block i's
    activation, then blocks i+1..L and the predictor.

    Attributes:
        layer (int): i.
        strides (list[int]): the levels in the model's head order.
        branches (list[dict[int, Tensor]]): per tower (class, box), stride -> (N, C, H, W).
    """

    layer: int
    strides: List[int]
    branches: List[Dict[int, Tensor]]


@dataclass
class AnchorMatches:
    """The student's anchors matched to the GT boxes (RPN anchors for a two-stage student).

    Attributes:
        strides (list[int]): levels in the model's own order; anchors concatenate in it.
        num_anchors (list[int]): A per level.
        anchors (dict[int, Boxes]): stride -> that level's (H*W*A) anchors.
        ious (list[Tensor]): per image, (G_i, R) IoU of every GT box with every anchor.
        matched_gt (Tensor): (N, R) int64, index (in its image) of the GT box with the
            highest IoU with each anchor, as detectron2's ``Matcher`` picks it; -1 in an image
            without GT boxes.
        matched_iou (Tensor): (N, R) that highest IoU (0 without GT boxes).
        labels (Tensor): (N, R) int64, the detector's own labelling: the matched GT's class
            for foreground anchors, ``num_classes`` for background, -1 for ignored.
        num_classes (int): C.
    """

    strides: List[int]
    num_anchors: List[int]
    anchors: Dict[int, Boxes]
    ious: List[Tensor]
    matched_gt: Tensor
    matched_iou: Tensor
    labels: Tensor
    num_classes: int

    @property
    def positive(self) -> Tensor:
        """(N, R) bool: anchors the detector trains as foreground."""
        return (self.labels >= 0) & (self.labels != self.num_classes)

    @property
    def gt_index(self) -> Tensor:
        """(N, R) int64: the matched GT index of positive anchors, -1 elsewhere."""
        return torch.where(self.positive, self.matched_gt, torch.full_like(self.matched_gt, -1))

    def per_level(self, x: Tensor) -> Dict[int, Tensor]:
        """Split a (N, R, ...) per-anchor tensor into stride -> (N, H*W*A, ...)."""
        sizes = [len(self.anchors[s]) for s in self.strides]
        return dict(zip(self.strides, torch.split(x, sizes, dim=1)))


@dataclass
class RPNOutputs:
    """One model's RPN outputs.

    Attributes:
        strides (list[int]), num_anchors (list[int]): levels in the RPN's order, A per level.
        anchors (dict[int, Boxes]): stride -> (H*W*A) anchors.
        objectness (dict[int, Tensor]): stride -> (N, A, H, W) logits.
        deltas (dict[int, Tensor]): stride -> (N, A*4, H, W).
        proposals (list[Instances]): per image, ``proposal_boxes`` and ``objectness_logits``
            (training top-k for the student, test top-k for the teacher, which is in eval mode).
    """

    strides: List[int]
    num_anchors: List[int]
    anchors: Dict[int, Boxes]
    objectness: Dict[int, Tensor]
    deltas: Dict[int, Tensor]
    proposals: List[Instances]


@dataclass
class SampledRoIs:
    """The RoIs the student's ROI heads sampled this step and its box head's outputs on them.

    Attributes:
        proposals (list[Instances]): per image, as ``ROIHeads.label_and_sample_proposals``
            returned them (``proposal_boxes``, ``gt_classes``, ``gt_boxes``, ...).
        boxes (Tensor): (R, 4) all RoIs, images concatenated in order.
        batch (Tensor): (R,) image index of each RoI.
        labels (Tensor): (R,) class, ``num_classes`` for background.
        gt_index (Tensor): (R,) index of the matched GT box in its image, -1 for background.
        student_logits (Tensor): (R, C+1) class logits; row r is RoI r.
        student_deltas (Tensor): (R, 4*C) or (R, 4) box deltas.
        num_classes (int): C.
    """

    proposals: List[Instances]
    boxes: Tensor
    batch: Tensor
    labels: Tensor
    gt_index: Tensor
    student_logits: Tensor
    student_deltas: Tensor
    num_classes: int

    @property
    def foreground(self) -> Tensor:
        return (self.labels >= 0) & (self.labels != self.num_classes)


class StepOutputs:
    """What a Distill meta-architecture supplies to the context for one step (the
    implementation lives in ``d2kd.modeling``). Every method may be expensive; the context
    calls each at most once per step. ``side`` is "student" or "teacher".

    Attributes:
        common_strides (list[int]): strides both models' FPNs produce, ascending.
        device (torch.device): the student's device.
    """

    common_strides: List[int] = []
    device: torch.device = torch.device("cpu")

    def images(self, side: str) -> ImageList:
        raise NotImplementedError

    def features(self, side: str) -> Dict[int, Tensor]:
        raise NotImplementedError

    def dense(self, side: str) -> DenseOutputs:
        raise NotImplementedError

    def rpn(self, side: str) -> RPNOutputs:
        raise NotImplementedError

    def rois(self) -> SampledRoIs:
        raise NotImplementedError

    def anchors(self) -> AnchorMatches:
        raise NotImplementedError

    def teacher_box_head(self, boxes: List[Boxes]) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def head_tower(self, side: str, layer: int) -> HeadTower:
        raise NotImplementedError

    def teacher_head_from(self, tower: HeadTower) -> DenseOutputs:
        raise NotImplementedError


class DistillContext:
    """Both models' results on one batch, handed to every distillation head.

    Always available: ``gt_instances`` (per image, ``gt_boxes`` / ``gt_classes`` in input
    pixels), ``num_classes`` (C, the same for both models), ``student_strides`` (the
    student's FPN levels, ascending), ``iteration``, ``max_iter``, ``prototype_bank`` (or
    None) and ``cache`` (a per-step memo heads share, e.g. robust weights).

    Computed on first use and then kept for the step: ``student_features``,
    ``teacher_features``, ``student_images``, ``teacher_images``, ``dense(side)``,
    ``rpn(side)``, ``rois``, ``teacher_roi_outputs``, ``anchors``, ``head_tower(side, layer)``;
    ``teacher_box_head(boxes)`` runs the teacher's box head on any boxes and
    ``teacher_head_from(tower)`` the teacher's dense head from a tower layer on any tensors
    (neither cached).
    """

    def __init__(self, outputs: StepOutputs, gt_instances: List[Instances], num_classes: int,
                 student_strides: List[int], iteration: int = 0, max_iter: int = 1,
                 prototype_bank: Any = None):
        self._outputs = outputs
        self._memo: Dict[Tuple[str, str], Any] = {}
        self.gt_instances = gt_instances
        self.num_classes = num_classes
        self.student_strides = sorted(student_strides)
        self.iteration = iteration
        self.max_iter = max_iter
        self.prototype_bank = prototype_bank
        self.cache: Dict[str, Any] = {}

    def _once(self, name: str, side: str, compute: Callable[[], Any]) -> Any:
        key = (name, side)
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # ---- images and features ----
    @property
    def student_images(self) -> ImageList:
        return self._once("images", STUDENT, lambda: self._outputs.images(STUDENT))

    @property
    def teacher_images(self) -> ImageList:
        return self._once("images", TEACHER, lambda: self._outputs.images(TEACHER))

    @property
    def student_features(self) -> Dict[int, Tensor]:
        """stride -> (N, C_s, H, W)."""
        return self._once("features", STUDENT, lambda: self._outputs.features(STUDENT))

    @property
    def teacher_features(self) -> Dict[int, Tensor]:
        """stride -> (N, C_t, H', W'); runs the teacher's backbone on first use."""
        return self._once("features", TEACHER, lambda: self._outputs.features(TEACHER))

    @property
    def common_strides(self) -> List[int]:
        """Strides both models produce, ascending (known without running the teacher)."""
        return self._outputs.common_strides

    @property
    def image_sizes(self) -> List[Tuple[int, int]]:
        """(h, w) of each unpadded input image of the student."""
        return self.student_images.image_sizes

    # ---- heads' outputs ----
    def dense(self, side: str = STUDENT) -> DenseOutputs:
        return self._once("dense", side, lambda: self._outputs.dense(side))

    def rpn(self, side: str = STUDENT) -> RPNOutputs:
        return self._once("rpn", side, lambda: self._outputs.rpn(side))

    @property
    def rois(self) -> SampledRoIs:
        return self._once("rois", STUDENT, self._outputs.rois)

    @property
    def teacher_roi_outputs(self) -> Tuple[Tensor, Tensor]:
        """The teacher's box-head (class logits (R, C+1), deltas) on the student's RoIs."""
        return self._once(
            "roi_outputs", TEACHER,
            lambda: self._outputs.teacher_box_head([p.proposal_boxes for p in self.rois.proposals]),
        )

    def teacher_box_head(self, boxes: List[Boxes]) -> Tuple[Tensor, Tensor]:
        """The teacher's box head on ``boxes`` (per image, input pixels): (logits, deltas)."""
        return self._outputs.teacher_box_head(boxes)

    @property
    def anchors(self) -> AnchorMatches:
        return self._once("anchors", STUDENT, self._outputs.anchors)

    # ---- dense-head towers, and the teacher's head on other tensors ----
    def head_tower(self, side: str, layer: int) -> HeadTower:
        """A model's tower outputs at ``layer`` (see :class:`HeadTower`): the student's as its
        own forward computed them (in the graph), the teacher's from its dense-head pass."""
        return self._once(f"head_tower.{layer}", side, lambda: self._outputs.head_tower(side, layer))

    def teacher_head_from(self, tower: HeadTower) -> DenseOutputs:
        """The teacher's dense head from ``tower.layer`` on, run on ``tower``'s tensors (which
        must have the teacher's tower channels): block ``layer``'s activation (if layer > 0),
        the teacher's remaining tower blocks, its predictors and per-level scales. The
        teacher's parameters stay frozen; gradients flow into the tensors."""
        return self._outputs.teacher_head_from(tower)

    # ---- conveniences ----
    @property
    def gt(self) -> Dict[str, Tensor]:
        """All GT boxes of the batch: ``boxes`` (M, 4), ``classes`` (M,), ``batch`` (M,)."""
        def flatten():
            boxes = cat([g.gt_boxes.tensor for g in self.gt_instances], dim=0)
            return {
                "boxes": boxes,
                "classes": cat([g.gt_classes for g in self.gt_instances], dim=0),
                "batch": cat([torch.full((len(g),), i, dtype=torch.long, device=boxes.device)
                              for i, g in enumerate(self.gt_instances)]),
            }
        return self._once("gt", STUDENT, flatten)

    @property
    def device(self) -> torch.device:
        return self._outputs.device

    def zero_loss(self) -> Tensor:
        """A float32 scalar 0 on the student's device: where a head starts a sum of loss terms."""
        return torch.zeros((), dtype=torch.float32, device=self.device)
