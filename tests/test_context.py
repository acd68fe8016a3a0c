"""The distillation context: accessors on both meta-architectures, the head contract, the
build-time requirement check, and a teacher that runs only as far as the heads need."""
from typing import Dict

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou
from detectron2.utils.events import EventStorage
from torch import Tensor

from conftest import distill_cfg, random_batch
from d2kd.heads import DISTILL_HEAD_REGISTRY, DistillHead
from d2kd.structures import STUDENT, TEACHER


class RecordingHead(DistillHead):
    """Keeps the context it was given (tests read it after the step)."""

    last = None

    def forward(self, ctx) -> Dict[str, Tensor]:
        RecordingHead.last = ctx
        return {}


# Registered from outside the package with the plain registry call: its config name comes
# from the class name ("toydense"), and it declares what it reads.
@DISTILL_HEAD_REGISTRY.register()
class ToyDenseHead(DistillHead):
    requires = frozenset({"student.dense", "teacher.dense", "paired_anchors"})

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, ctx) -> Dict[str, Tensor]:
        student, teacher = ctx.dense(STUDENT).concat(0), ctx.dense(TEACHER).concat(0)
        return {self.loss_key(): self.scale * ((student.sigmoid() - teacher.sigmoid()) ** 2).mean()}


DISTILL_HEAD_REGISTRY.register(RecordingHead)


def _step(cfg, heads, batch=None):
    cfg.DISTILL.HEADS = list(heads)
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(batch or random_batch(empty_last=True))
    return model, losses


def test_toy_head_registered_outside_the_package_trains_a_step(tmp_path):
    cfg = distill_cfg(tmp_path, "retinanet", "retinanet")
    model, losses = _step(cfg, ["toydense"])
    assert losses["loss_distill_toydense"].item() > 0
    sum(losses.values()).backward()
    assert model.distill_heads["toydense"].scale.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())


def test_dense_accessors_match_detectrons_own_layout(tmp_path):
    cfg = distill_cfg(tmp_path, "retinanet", "retinanet")
    model, _ = _step(cfg, ["recording"])
    ctx = RecordingHead.last
    dense = ctx.dense(STUDENT)
    assert dense.strides == [8, 16, 32, 64, 128] and dense.num_anchors == [9] * 5
    # the maps are exactly what the head returns, and the flat form is detectron2's own
    features = [ctx.student_features[s] for s in dense.strides]
    with torch.no_grad():
        logits, deltas = model.head(features)
        flat_logits, flat_deltas = model._transpose_dense_predictions([logits, deltas], [model.num_classes, 4])
    for s, lg in zip(dense.strides, logits):
        assert dense.cls_maps[s].shape == (2, 9 * 3, *lg.shape[-2:])
        assert torch.allclose(dense.cls_maps[s], lg)
    assert torch.allclose(dense.concat(0), torch.cat(flat_logits, 1))
    assert torch.allclose(dense.concat(1), torch.cat(flat_deltas, 1))
    # the teacher's dense outputs have the same layout over the same anchors
    assert dense.concat(0).shape == ctx.dense(TEACHER).concat(0).shape
    # anchors: GT index consistent with the labels RetinaNet trained on, IoUs with the GT
    anchors = ctx.anchors
    assert anchors.labels.shape == anchors.matched_gt.shape == (2, dense.concat(0).shape[1])
    pos = anchors.positive
    assert pos.any() and not pos[1].any()  # the last image has no GT
    gt = ctx.gt_instances[0]
    assert torch.equal(anchors.labels[0][pos[0]], gt.gt_classes[anchors.gt_index[0][pos[0]]])
    all_anchors = torch.cat([anchors.anchors[s].tensor for s in anchors.strides])
    iou = pairwise_iou(gt.gt_boxes, type(anchors.anchors[8])(all_anchors))
    assert torch.allclose(anchors.matched_iou[0], iou.max(0).values)
    assert [len(v[0]) if v.dim() > 1 else len(v) for v in anchors.per_level(anchors.labels).values()] == [
        len(anchors.anchors[s]) for s in anchors.strides
    ]


def test_two_stage_accessors(tmp_path):
    cfg = distill_cfg(tmp_path, "rcnn", "rcnn")
    model, _ = _step(cfg, ["recording"])
    ctx = RecordingHead.last
    rois = ctx.rois
    num_rois = sum(len(p) for p in rois.proposals)
    assert rois.student_logits.shape == (num_rois, 4) and rois.boxes.shape == (num_rois, 4)
    fg = rois.foreground
    assert fg.any() and (rois.gt_index[~fg] == -1).all()
    # the matched GT of every foreground RoI is the GT box ROIHeads copied into it
    for i, (props, gts) in enumerate(zip(rois.proposals, ctx.gt_instances)):
        mine = rois.batch == i
        keep = fg[mine]
        if keep.any():
            index = rois.gt_index[mine][keep]
            assert torch.equal(props.gt_boxes.tensor[keep], gts.gt_boxes.tensor[index])
            assert torch.equal(props.gt_classes[keep], gts.gt_classes[index])
    t_logits, t_deltas = ctx.teacher_roi_outputs
    assert t_logits.shape == rois.student_logits.shape
    rpn = ctx.rpn(STUDENT)
    assert rpn.strides == [4, 8, 16, 32, 64]
    assert rpn.objectness[4].shape[:2] == (2, 3) and rpn.deltas[4].shape[1] == 12
    teacher_rpn = ctx.rpn(TEACHER)
    assert len(teacher_rpn.proposals) == 2 and teacher_rpn.objectness[8].shape[1] == 3
    anchors = ctx.anchors  # RPN anchors matched to GT, for heads such as FGFI
    assert anchors.strides == rpn.strides and anchors.matched_gt.shape[1] == sum(len(a) for a in rpn.anchors.values())
    assert ctx.teacher_images.tensor.shape[0] == 2 and ctx.student_images.tensor.shape[0] == 2


def test_accessors_compute_once_per_step(tmp_path):
    cfg = distill_cfg(tmp_path, "rcnn", "rcnn")
    model, _ = _step(cfg, ["recording"])
    ctx = RecordingHead.last
    assert ctx.teacher_features is ctx.teacher_features
    assert ctx.rois is ctx.rois and ctx.anchors is ctx.anchors


def _count_calls(module, counts, name):
    def hook(*_):
        counts[name] = counts.get(name, 0) + 1
    module.register_forward_hook(hook)


@pytest.mark.parametrize("arch,heads,expected", [
    ("rcnn", ["fitnet"], {"backbone": 1}),
    ("rcnn", ["kd"], {"backbone": 1, "box_head": 1}),
    ("rcnn", ["fitnet", "kd"], {"backbone": 1, "box_head": 1}),
    ("retinanet", ["fitnet"], {"backbone": 1}),
    ("retinanet", ["kd"], {"backbone": 1, "dense_head": 1}),
    ("rcnn", ["recording"], {}),
])
def test_teacher_runs_only_as_far_as_the_heads_need(tmp_path, arch, heads, expected):
    cfg = distill_cfg(tmp_path, arch, arch, heads=heads)
    model = build_model(cfg)
    model.train()
    counts = {}
    teacher = model.teacher
    _count_calls(teacher.backbone, counts, "backbone")
    if arch == "rcnn":
        _count_calls(teacher.roi_heads.box_head, counts, "box_head")
        _count_calls(teacher.proposal_generator, counts, "rpn")
    else:
        _count_calls(teacher.head, counts, "dense_head")
    with EventStorage(0):
        model(random_batch())
    assert counts == expected  # "recording" declares features but reads nothing: nothing runs
    if heads != ["recording"]:
        parts = model.teacher_parts()
        assert ("box head" in parts) == ("box_head" in expected) and ("dense head" in parts) == ("dense_head" in expected)


def test_head_requiring_what_the_pair_lacks_is_rejected_at_build(tmp_path):
    cfg = distill_cfg(tmp_path, "rcnn", "rcnn", heads=["toydense"])
    with pytest.raises(ValueError, match="head 'toydense' requires 'student.dense'.*two-stage detector"):
        build_model(cfg)


def test_unknown_requirement_is_rejected_naming_head_and_key(tmp_path):
    class OddHead(DistillHead):
        requires = frozenset({"teacher.telepathy"})

        def forward(self, ctx):
            return {}

    DISTILL_HEAD_REGISTRY.register(OddHead)
    cfg = distill_cfg(tmp_path, heads=["odd"])
    with pytest.raises(ValueError, match="head 'odd' requires 'teacher.telepathy', which is not a context key"):
        build_model(cfg)


def test_eval_only_builds_no_teacher(tmp_path, monkeypatch):
    """--eval-only on a distillation config evaluates the plain student: no teacher is built
    or loaded (its weights may be absent)."""
    from detectron2.engine import default_argument_parser

    import d2kd.train_net as tn
    from d2kd.engine import DistillTrainer

    cfg = distill_cfg(tmp_path, heads=["gk"])
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "distilled.pth")
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "gone.pth")
    cfg.OUTPUT_DIR = str(tmp_path / "eval")
    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text(cfg.dump())
    seen = {}
    monkeypatch.setattr(DistillTrainer, "test", classmethod(lambda cls, cfg, model: seen.setdefault("m", model) and {}))
    args = default_argument_parser().parse_args(
        ["--config-file", str(cfg_file), "--eval-only", "MODEL.WEIGHTS", str(tmp_path / "distilled.pth")]
    )
    tn.main(args)
    student = seen["m"]
    assert type(student).__name__ == "GeneralizedRCNN" and not hasattr(student, "teacher")
    state = model.state_dict()
    for k, v in student.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("arch,head,key,bad", [
    ("rcnn", "gk", "INSTANCES", "boxes"),
    ("rcnn", "gk", "RESPONSE_ROIS", "some"),
    ("rcnn", "fgfi", "MAX_IOU_OVER", "nearest"),
    ("retinanet", "pfi", "SCORES", "probits"),
    ("retinanet", "rank_mimic", "SCORES", "probits"),
])
def test_a_bad_option_value_names_the_key_the_value_and_the_choices(tmp_path, arch, head, key, bad):
    cfg = distill_cfg(tmp_path, arch, arch, heads=[head])
    cfg.DISTILL[head.upper()][key] = bad
    with pytest.raises(ValueError, match=rf"DISTILL.{head.upper()}.{key} must be one of .*; got '{bad}'"):
        build_model(cfg)
