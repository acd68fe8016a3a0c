"""Cascade R-CNN teachers: the box head on given boxes is what the cascade predicts at inference."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import cascade_rcnn
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from conftest import detector_cfg, distill_cfg, random_batch, save_plain_model, write_yaml
from d2kd.modeling.box_head_on import box_head_on


def cascade_cfg(num_classes=3, channels=32):
    cfg = detector_cfg("rcnn", channels, num_classes=num_classes)
    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True  # as detectron2's cascade configs
    return cfg


def _features_and_boxes(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = random_batch(seed=seed)
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    boxes = []
    for h, w in images.image_sizes:
        xy = torch.rand(6, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 6 + torch.rand(6, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        boxes.append(Boxes(torch.cat([xy, xy + wh], dim=1)))
    return features, boxes, images.image_sizes


def test_a_cascade_teachers_box_head_is_its_own_inference_score_on_the_same_boxes(monkeypatch):
    torch.manual_seed(0)
    model = build_model(cascade_cfg()).eval()
    features, boxes, sizes = _features_and_boxes(model)
    seen = {}

    def capture(boxes_, scores, image_sizes, *args):
        seen["boxes"], seen["scores"] = boxes_, scores
        return [], []

    # the cascade's own inference path, from these boxes as its proposals, up to its NMS
    monkeypatch.setattr(cascade_rcnn, "fast_rcnn_inference", capture)
    with torch.no_grad():
        from detectron2.structures import Instances

        proposals = []
        for b, size in zip(boxes, sizes):
            p = Instances(size)
            p.proposal_boxes = b
            proposals.append(p)
        model.roi_heads._forward_box(features, proposals)
        logits, deltas = box_head_on(model.roi_heads, features, boxes, sizes)
    expected_scores = torch.cat(seen["scores"])
    assert logits.shape == expected_scores.shape == (12, 4)
    torch.testing.assert_close(logits.softmax(dim=1), expected_scores, rtol=1e-5, atol=1e-6)
    # the deltas decode, on the given boxes, to the cascade's final boxes
    start = torch.cat([b.tensor for b in boxes])
    transform = model.roi_heads.box_predictor[-1].box2box_transform
    torch.testing.assert_close(transform.apply_deltas(deltas, start), torch.cat(seen["boxes"]), rtol=1e-4, atol=1e-3)
    # and they are not one stage's alone (the three stages differ)
    stage0, _ = box_head_on(model.roi_heads, features, boxes, sizes, cascade_stage=0)
    assert not torch.allclose(stage0.softmax(dim=1), expected_scores, atol=1e-3)


def test_one_stage_of_the_cascade_on_request():
    torch.manual_seed(0)
    model = build_model(cascade_cfg()).eval()
    features, boxes, sizes = _features_and_boxes(model)
    roi = model.roi_heads
    with torch.no_grad():
        first, _ = box_head_on(roi, features, boxes, sizes, cascade_stage=0)
        # stage 0 sees the given boxes themselves
        x = roi.box_pooler([features[f] for f in roi.box_in_features], boxes)
        by_hand = roi.box_predictor[0](roi.box_head[0](x))[0]
        torch.testing.assert_close(first, by_hand)
        with pytest.raises(ValueError, match="has 3 stages: give -1"):
            box_head_on(roi, features, boxes, sizes, cascade_stage=3)


def test_a_plain_teacher_is_unchanged():
    torch.manual_seed(0)
    model = build_model(detector_cfg("rcnn", 32)).eval()
    features, boxes, sizes = _features_and_boxes(model)
    roi = model.roi_heads
    with torch.no_grad():
        logits, deltas = box_head_on(roi, features, boxes, sizes)
        x = roi.box_pooler([features[f] for f in roi.box_in_features], boxes)
        by_hand = roi.box_predictor(roi.box_head(x))
    torch.testing.assert_close(logits, by_hand[0])
    torch.testing.assert_close(deltas, by_hand[1])


def _cascade_teacher_cfg(tmp_path, heads, **teacher):
    """A Faster R-CNN student config whose teacher is a freshly saved random cascade."""
    t_cfg = cascade_cfg(channels=32)
    t_yaml = write_yaml(t_cfg, tmp_path / "cascade.yaml")
    t_weights = str(tmp_path / "cascade.pth")
    save_plain_model(t_cfg, t_weights, seed=1)
    cfg = distill_cfg(tmp_path, heads=heads)
    cfg.DISTILL.TEACHER.CONFIG_FILE = t_yaml
    cfg.DISTILL.TEACHER.WEIGHTS = t_weights
    for key, value in teacher.items():
        setattr(cfg.DISTILL.TEACHER, key, value)
    return cfg


@pytest.mark.parametrize("heads", [["kd"], ["gk"], ["defeat"]])
def test_heads_that_read_the_teachers_box_head_train_a_step_from_a_cascade_teacher(tmp_path, heads):
    cfg = _cascade_teacher_cfg(tmp_path, heads)
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(random_batch())
    distill = {k: v for k, v in losses.items() if k.startswith("loss_distill")}
    assert distill and all(torch.isfinite(v) for v in distill.values())
    # the term that reads the cascade's scores is there and non-zero
    reads_scores = {"kd": "loss_distill_kd", "gk": "loss_distill_gk_response", "defeat": "loss_distill_defeat_kl_fg"}
    assert distill[reads_scores[heads[0]]].item() > 0, distill
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


def test_the_kd_target_from_a_cascade_is_its_mean_score_and_one_stage_on_request(tmp_path):
    cfg = _cascade_teacher_cfg(tmp_path, ["kd"])
    model = build_model(cfg)
    model.train()
    seen = []
    from d2kd.modeling import step_outputs

    original = step_outputs.box_head_on

    def recording(roi_heads, features, boxes, sizes, stage):
        out = original(roi_heads, features, boxes, sizes, stage)
        seen.append((stage, out[0]))
        return out

    import unittest.mock as mock

    with mock.patch.object(step_outputs, "box_head_on", recording), EventStorage(0):
        model(random_batch())
    assert seen and seen[0][0] == -1
    # log-probabilities of the cascade's mean score: they exponentiate to rows summing to 1
    torch.testing.assert_close(seen[0][1].exp().sum(dim=1), torch.ones(len(seen[0][1])))

    (tmp_path / "one").mkdir()
    one = _cascade_teacher_cfg(tmp_path / "one", ["kd"], CASCADE_STAGE=2)
    assert build_model(one).teacher_cascade_stage == 2
    (tmp_path / "bad").mkdir()
    bad = _cascade_teacher_cfg(tmp_path / "bad", ["kd"], CASCADE_STAGE=5)
    with pytest.raises(ValueError, match="CASCADE_STAGE is 5, but the teacher's cascade has 3 stages"):
        build_model(bad)


def test_a_cascade_student_is_refused_with_what_to_use_instead(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["fitnet"])
    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    with pytest.raises(ValueError, match="a Cascade R-CNN student .* is not supported"):
        build_model(cfg)
