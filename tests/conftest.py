"""Tiny CPU models and batches shared by the tests."""
import os

import pytest
import torch

import d2kd  # noqa: F401
from d2kd import add_distill_config
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

torch.set_num_threads(1)


def detector_cfg(arch: str = "rcnn", fpn_channels: int = 16, num_classes: int = 3, depth: int = 18):
    """A tiny plain detectron2 config (Faster R-CNN FPN or RetinaNet) for 64-96 px CPU tests."""
    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = fpn_channels
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    # random or barely trained test models: keep every box so inference comparisons see some
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    if arch == "rcnn":
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
        cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
        cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
        cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 32
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    else:
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [16, 32, 64, 128, 256]]
        cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
        cfg.MODEL.RETINANET.NUM_CONVS = 1
    return cfg


def save_plain_model(cfg, path, seed: int = 0):
    """Build the plain detector ``cfg`` describes with random weights and save it as ``path``."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, path)
    return model


def write_yaml(cfg, path):
    with open(path, "w") as f:
        f.write(cfg.dump())
    return str(path)


def distill_cfg(tmp_path, student_arch="rcnn", teacher_arch="rcnn", heads=("fitnet",),
                student_channels=16, teacher_channels=32, num_classes=3, teacher_classes=None):
    """A Distill* config with a freshly saved random teacher under ``tmp_path``."""
    teacher_classes = teacher_classes or num_classes
    teacher = detector_cfg(teacher_arch, teacher_channels, num_classes=teacher_classes)
    name = f"teacher_{teacher_arch}_{teacher_channels}_{teacher_classes}"
    t_yaml = write_yaml(teacher, tmp_path / f"{name}.yaml")
    t_weights = str(tmp_path / f"{name}.pth")
    if not os.path.exists(t_weights):
        save_plain_model(teacher, t_weights, seed=1)
    cfg = detector_cfg(student_arch, student_channels, num_classes=num_classes)
    cfg.MODEL.META_ARCHITECTURE = "DistillRCNN" if student_arch == "rcnn" else "DistillRetinaNet"
    cfg.DISTILL.TEACHER.CONFIG_FILE = t_yaml
    cfg.DISTILL.TEACHER.WEIGHTS = t_weights
    cfg.DISTILL.HEADS = list(heads)
    cfg.SOLVER.MAX_ITER = 10
    return cfg


def random_batch(num_images=2, size=(64, 80), num_classes=3, empty_last=False, seed=0):
    """Raw detectron2 inputs: uint8-range float images in (C, H, W) and GT instances."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(num_images):
        h, w = size
        img = torch.rand(3, h, w, generator=g) * 255
        n = 0 if (empty_last and i == num_images - 1) else 3
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        batch.append({"image": img, "instances": inst, "height": h, "width": w})
    return batch


@pytest.fixture
def storage():
    with EventStorage(0) as s:
        yield s


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory):
    """The built-in shapes dataset generated once per test session in a temporary cache."""
    from d2kd.data import register_shapes_datasets

    root = tmp_path_factory.mktemp("d2kd_cache")
    old = os.environ.get("D2KD_CACHE")
    os.environ["D2KD_CACHE"] = str(root)
    register_shapes_datasets()
    yield root
    if old is None:
        os.environ.pop("D2KD_CACHE")
    else:
        os.environ["D2KD_CACHE"] = old
    register_shapes_datasets()


def training_cfg(tmp_path, heads=("fitnet",), max_iter=4):
    """A distillation config that trains on the built-in data for a few CPU iterations."""
    cfg = distill_cfg(tmp_path, heads=heads, num_classes=6)
    cfg.DATASETS.TRAIN = ("d2kd_shapes_train",)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.001
    # the random teacher's features are large: keep the imitation term from dominating
    cfg.DISTILL.FITNET.WEIGHT = 1e-6
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    return cfg


class FakeStepOutputs:
    """A hand-made step for head unit tests: features, optional RoIs with both models'
    logits (the teacher's box head answers by looking its boxes up among the RoIs)."""

    def __init__(self, student_features, teacher_features, rois=None, teacher_logits=None):
        self.student_features, self.teacher_features = student_features, teacher_features
        self._rois, self._teacher_logits = rois, teacher_logits
        self.common_strides = sorted(set(student_features) & set(teacher_features))
        self.device = torch.device("cpu")

    def features(self, side):
        return self.student_features if side == "student" else self.teacher_features

    def rois(self):
        return self._rois

    def teacher_box_head(self, boxes):
        wanted = torch.cat([b.tensor for b in boxes])
        rows = [int((self._rois.boxes == box).all(dim=1).nonzero()[0]) for box in wanted]
        return self._teacher_logits[rows], None


def fake_context(student_features, teacher_features, gt_instances, num_classes, rois=None,
                 teacher_logits=None, strides=(8, 16)):
    from d2kd.structures import DistillContext

    outputs = FakeStepOutputs(student_features, teacher_features, rois, teacher_logits)
    return DistillContext(outputs, gt_instances=gt_instances, num_classes=num_classes, student_strides=list(strides))


def sampled_rois(proposals, logits, num_classes):
    """SampledRoIs from per-image proposals with ``gt_classes`` (and a ``gt_index`` field)."""
    from d2kd.structures import SampledRoIs

    boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
    return SampledRoIs(
        proposals=proposals,
        boxes=boxes,
        batch=torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(proposals)]),
        labels=torch.cat([p.gt_classes for p in proposals]),
        gt_index=torch.cat([p.gt_index for p in proposals]),
        student_logits=logits,
        student_deltas=None,
        num_classes=num_classes,
    )
