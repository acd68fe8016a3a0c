"""The student's recorded results and the teacher's lazily computed ones, for one step.

:class:`ModelStepOutputs` implements :class:`d2kd.structures.StepOutputs` for any pair of
two-stage and dense detectors. The student ran its own ``forward``; what its submodules
returned was recorded (see :mod:`d2kd.modeling.recorder`). The teacher runs here, under
``torch.no_grad()``, only as far as a head asks.

Mixed precision: the heads run with autocast disabled (their losses are float32), but the
teacher's passes, which they trigger lazily, re-enter the autocast state that was active when
the step's outputs were made (the student's forward), so the teacher runs in the same
precision as the student. Under autocast the student's features are handed out in float32,
so that a head's float32 modules (adapters) can take them with autocast off.
"""
from contextlib import contextmanager
from typing import Any, Dict, List, Tuple

import torch
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from torch import Tensor

from ..structures import (
    STUDENT,
    TEACHER,
    AnchorMatches,
    DenseOutputs,
    HeadTower,
    RPNOutputs,
    SampledRoIs,
    StepOutputs,
    by_stride,
)
from ..config import DEFAULT_TEACHER
from .box_head_on import box_head_on
from .head_tower import head_from, tower_key


def dense_outputs(model, predictions) -> DenseOutputs:
    """A dense detector's head outputs (per branch, per level in ``head_in_features`` order)."""
    strides = [model.backbone.output_shape()[f].stride for f in model.head_in_features]
    num_anchors = list(model.anchor_generator.num_cell_anchors)
    return DenseOutputs(
        strides=strides,
        num_anchors=num_anchors,
        branches=[dict(zip(strides, branch)) for branch in predictions],
    )


def rpn_outputs(model, anchors: List[Boxes], head_out, proposals: List[Instances]) -> RPNOutputs:
    rpn = model.proposal_generator
    strides = [model.backbone.output_shape()[f].stride for f in rpn.in_features]
    objectness, deltas = head_out
    return RPNOutputs(
        strides=strides,
        num_anchors=list(rpn.anchor_generator.num_cell_anchors),
        anchors=dict(zip(strides, anchors)),
        objectness=dict(zip(strides, objectness)),
        deltas=dict(zip(strides, deltas)),
        proposals=proposals,
    )


class ModelStepOutputs(StepOutputs):
    """Both models' results on one batch.

    Args:
        model: the Distill meta-architecture (the student, holding the hidden teacher).
        batched_inputs (list[dict]): the raw batch.
        record (dict): what the student's recorder kept during its forward.
        gt_instances (list[Instances]): the batch's GT, on the student's device.
        teacher (TeacherSlot): the teacher this context's side "teacher" is (default: the
            model's default teacher); several instances may share the student's ``record``.
    """

    def __init__(self, model, batched_inputs: List[dict], record: Dict[str, Any], gt_instances, teacher=None):
        self.model = model
        slot = teacher if teacher is not None else model.teacher_slots()[DEFAULT_TEACHER]
        self.slot = slot
        self.teacher = slot.module
        self.batched_inputs = batched_inputs
        self.record = record
        self.gt_instances = gt_instances
        self.device = model.device
        self.common_strides = slot.common_strides
        self._teacher_named: Dict[str, Tensor] = {}
        self._teacher_images = None
        self._teacher_head = None  # (predictions, tower record) of the teacher's dense-head pass
        # The autocast state of the student's forward, re-entered for the teacher's passes.
        kind = self.device.type
        self._autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    @contextmanager
    def _teacher_pass(self):
        """no_grad, and the student's forward's autocast state, for a teacher pass."""
        kind, enabled, dtype = self._autocast
        with torch.no_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            yield

    def _recorded(self, key: str, what: str):
        if key not in self.record:
            raise RuntimeError(
                f"the student ({type(self.model).__name__}) produced no {what} this step; a "
                "head read it without declaring it in `requires`, or the student's "
                "architecture does not produce it"
            )
        return self.record[key]

    # ---- images and features ----
    def images(self, side: str) -> ImageList:
        if side == STUDENT:
            return self._recorded("images", "preprocessed images")
        if self._teacher_images is None:
            self._teacher_images = self.slot.images(self.batched_inputs)
        return self._teacher_images

    def _teacher_features_named(self) -> Dict[str, Tensor]:
        if not self._teacher_named:
            with self._teacher_pass():
                self._teacher_named = self.teacher.backbone(self.images(TEACHER).tensor)
        return self._teacher_named

    def features(self, side: str) -> Dict[int, Tensor]:
        if side == STUDENT:
            features = by_stride(self.model.backbone, self._recorded("backbone", "backbone features"))
            if self._autocast[1]:  # float32 into the heads, which run with autocast off
                features = {s: f.float() for s, f in features.items()}
            return features
        return by_stride(self.teacher.backbone, self._teacher_features_named())

    # ---- dense heads ----
    def _teacher_dense_pass(self):
        """The teacher's dense head on its features, once per step; its tower layers that the
        heads read are recorded on the way (``teacher.head_tower``)."""
        if self._teacher_head is None:
            teacher = self.teacher
            named = self._teacher_features_named()
            with self._teacher_pass(), self.slot.recorder.recording() as rec:
                predictions = teacher.head([named[f] for f in teacher.head_in_features])
            towers = {k: v for k, v in rec.items() if k.startswith("tower.")}
            self._teacher_head = (predictions, towers)
        return self._teacher_head

    def dense(self, side: str) -> DenseOutputs:
        if side == STUDENT:
            return dense_outputs(self.model, self._recorded("dense.head", "dense-head outputs"))
        return dense_outputs(self.teacher, self._teacher_dense_pass()[0])

    def head_tower(self, side: str, layer: int) -> HeadTower:
        model = self.model if side == STUDENT else self.teacher
        kind = self.model.kind if side == STUDENT else self.slot.kind
        strides = [model.backbone.output_shape()[f].stride for f in model.head_in_features]
        if layer == 0:  # the head's input: the FPN features
            if side == STUDENT:
                named = self._recorded("backbone", "backbone features")
            else:
                named = self._teacher_features_named()
            level = [named[f] for f in model.head_in_features]
            branches = [dict(zip(strides, level)) for _ in kind.towers.branches]
        else:
            record = self.record if side == STUDENT else self._teacher_dense_pass()[1]
            branches = []
            for b in range(len(kind.towers.branches)):
                key = tower_key(b, layer)
                if key not in record:
                    raise RuntimeError(
                        f"the {side}'s tower layer {layer} was not recorded this step; a head read it "
                        "without requiring it or without naming it in tower_layers"
                    )
                branches.append(dict(zip(strides, record[key])))
        if side == STUDENT and self._autocast[1]:  # float32 into the heads, as the features
            branches = [{s: x.float() for s, x in br.items()} for br in branches]
        return HeadTower(layer=layer, strides=strides, branches=branches)

    def teacher_head_from(self, tower: HeadTower) -> DenseOutputs:
        teacher = self.teacher
        strides = [teacher.backbone.output_shape()[f].stride for f in teacher.head_in_features]
        if list(tower.strides) != strides:
            raise ValueError(f"the tower's levels {tower.strides} are not the teacher's head levels {strides}")
        inputs = [[branch[s] for s in strides] for branch in tower.branches]
        kind, enabled, dtype = self._autocast
        # no no_grad here: the teacher's parameters are frozen (requires_grad False), the graph
        # of the inputs is kept so that the loss reaches whatever produced them
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            predictions = head_from(teacher, self.slot.kind, tower.layer, inputs)
        return dense_outputs(teacher, predictions)

    # ---- two-stage parts ----
    def rpn(self, side: str) -> RPNOutputs:
        if side == STUDENT:
            proposals, _ = self._recorded("rpn.out", "RPN outputs")
            return rpn_outputs(
                self.model, self._recorded("rpn.anchors", "RPN anchors"), self.record["rpn.head"], proposals
            )
        named = self._teacher_features_named()
        with self._teacher_pass(), self.slot.recorder.recording() as rec:
            proposals, _ = self.teacher.proposal_generator(self.images(TEACHER), named)
        return rpn_outputs(self.teacher, rec["rpn.anchors"], rec["rpn.head"], proposals)

    def rois(self) -> SampledRoIs:
        sampled, _ = self._recorded("roi.out", "sampled RoIs")
        logits, deltas = self._recorded("roi.predictions", "box-head outputs")
        roi_heads = self.model.roi_heads
        gt_index = []
        with torch.no_grad():
            for props, gts in zip(sampled, self.gt_instances):
                if len(gts) == 0:
                    gt_index.append(torch.full((len(props),), -1, dtype=torch.long, device=self.device))
                    continue
                # The matcher label_and_sample_proposals ran, on the sampled columns only:
                # per-proposal matches do not depend on the other proposals.
                matched, _ = roi_heads.proposal_matcher(pairwise_iou(gts.gt_boxes, props.proposal_boxes))
                fg = props.gt_classes != roi_heads.num_classes
                gt_index.append(torch.where(fg, matched, torch.full_like(matched, -1)))
        boxes = torch.cat([p.proposal_boxes.tensor for p in sampled])
        return SampledRoIs(
            proposals=sampled,
            boxes=boxes,
            batch=torch.cat([torch.full((len(p),), i, dtype=torch.long, device=boxes.device)
                             for i, p in enumerate(sampled)]),
            labels=torch.cat([p.gt_classes for p in sampled]),
            gt_index=torch.cat(gt_index),
            student_logits=logits,
            student_deltas=deltas,
            num_classes=roi_heads.num_classes,
        )

    def teacher_box_head(self, boxes: List[Boxes]) -> Tuple[Tensor, Tensor]:
        # a Cascade R-CNN teacher answers with its own inference score (d2kd/modeling/box_head_on.py)
        named = self._teacher_features_named()
        image_sizes = self.images(TEACHER).image_sizes
        with self._teacher_pass():
            return box_head_on(self.teacher.roi_heads, named, boxes, image_sizes, self.slot.cascade_stage)

    # ---- anchors matched to GT ----
    def anchors(self) -> AnchorMatches:
        model = self.model
        num_classes = model.kind.num_classes(model)
        if "dense.anchors" in self.record:
            dense = dense_outputs(model, self.record["dense.head"])
            strides, num_anchors = dense.strides, dense.num_anchors
            level_anchors = self.record["dense.anchors"]
            labels = self._recorded("dense.anchor_labels", "anchor labels")
            matcher = None
        else:
            rpn = self.rpn(STUDENT)
            strides, num_anchors = rpn.strides, rpn.num_anchors
            level_anchors = [rpn.anchors[s] for s in strides]
            labels = None
            matcher = model.proposal_generator.anchor_matcher
        anchors = Boxes.cat(level_anchors)
        # A detector whose assignment is not the arg-max IoU (GFL's ATSS) records its own
        # matched GT per anchor (-1 where it matched none); it takes precedence there.
        assigned = self.record.get("dense.anchor_matched_gt")
        ious, matched, best, rows = [], [], [], []
        with torch.no_grad():
            for i, gts in enumerate(self.gt_instances):
                iou = pairwise_iou(gts.gt_boxes, anchors)  # (G, R)
                ious.append(iou)
                if len(gts) == 0:
                    matched.append(torch.full((len(anchors),), -1, dtype=torch.long, device=self.device))
                    best.append(torch.zeros(len(anchors), device=self.device))
                    if labels is None:
                        rows.append(torch.full((len(anchors),), num_classes, dtype=torch.long, device=self.device))
                    continue
                value, index = iou.max(dim=0)  # detectron2's Matcher picks the same arg-max
                if assigned is not None:
                    index = torch.where(assigned[i] >= 0, assigned[i], index)
                    value = iou.gather(0, index[None]).squeeze(0)
                matched.append(index)
                best.append(value)
                if labels is None:
                    # the RPN's own foreground / background / ignore decision, before sampling
                    _, objectness = matcher(iou)
                    row = gts.gt_classes[index].clone()
                    row[objectness == 0] = num_classes
                    row[objectness == -1] = -1
                    rows.append(row)
        return AnchorMatches(
            strides=strides,
            num_anchors=num_anchors,
            anchors=dict(zip(strides, level_anchors)),
            ious=ious,
            matched_gt=torch.stack(matched),
            matched_iou=torch.stack(best),
            labels=labels if labels is not None else torch.stack(rows),
            num_classes=num_classes,
        )
