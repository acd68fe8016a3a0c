"""LazyConfig (.py) teachers: a ViT + SimpleFeaturePyramid teacher loads strictly into a
DistillRCNN student, stays frozen, hidden and in eval mode, pairs its p2-p6 with the student's by
stride, and refuses a wrong or corrupt checkpoint as a yacs teacher does; DISTILL.TEACHER.OPTS
are LazyConfig overrides; tools/lazy_train_net.py trains and resumes a LazyConfig model."""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import detector_cfg, distill_cfg, random_batch, save_plain_model
from d2kd.config import load_config, resolve_teacher_config_file
from d2kd.modeling.lazy_teacher import LazyTeacherConfig, build_lazy_teacher_model
from d2kd.modeling.teacher import TeacherConfigError, build_teacher, build_teacher_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "configs", "shapes")
VIT_TEACHER = os.path.join(SHAPES, "vitdet_faster_rcnn_ViT_tiny_SFP_2k_shapes.py")

# A tiny ViTDet-style Faster R-CNN (64 px, ViT width 32, 2 blocks, SFP 32 channels by default).
TINY = '''{preamble}
from functools import partial

import detectron2.data.transforms as T
import torch
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import SimpleFeaturePyramid, ViT
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import CosineParamScheduler
from omegaconf import OmegaConf
from torch import nn

C = {channels}
model = L(GeneralizedRCNN)(
    backbone=L(SimpleFeaturePyramid)(
        net=L(ViT)(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, window_size=2,
                   window_block_indexes=[0], use_rel_pos=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                   out_feature="last_feat"),
        in_feature="${{.net.out_feature}}", out_channels=C, scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=L(LastLevelMaxPool)(), norm="LN", square_pad={square_pad},
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=C, num_anchors=3, conv_dims=[-1, -1]),
        anchor_generator=L(DefaultAnchorGenerator)(sizes=[[16], [32], [64], [128], [256]],
                                                   aspect_ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=32, positive_fraction=0.5, pre_nms_topk=(200, 200), post_nms_topk=(50, 50),
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes={num_classes}, batch_size_per_image=32, positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(output_size=7, scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
                                sampling_ratio=0, pooler_type="ROIAlignV2"),
        box_head=L(FastRCNNConvFCHead)(input_shape=ShapeSpec(channels=C, height=7, width=7),
                                       conv_dims=[C], fc_dims=[32], conv_norm="LN"),
        box_predictor=L(FastRCNNOutputLayers)(input_shape=ShapeSpec(channels=32), test_score_thresh=0.0,
                                              box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
                                              num_classes="${{..num_classes}}"),
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    {input_format}
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="{train_set}"),
    mapper=L(DatasetMapper)(is_train=True, augmentations=[L(T.ResizeShortestEdge)(short_edge_length=64, max_size=64)],
                            image_format="{mapper_format}"),
    total_batch_size=2, num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="{test_set}", filter_empty=False),
    mapper=L(DatasetMapper)(is_train=False, augmentations=[L(T.ResizeShortestEdge)(short_edge_length=64, max_size=64)],
                            image_format="${{...train.mapper.image_format}}"),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${{..test.dataset.names}}", output_dir="{out}/eval")
optimizer = L(torch.optim.SGD)(params=L(get_default_optimizer_params)(weight_decay_norm=0.0), lr=0.001, momentum=0.9)
train = dict(output_dir="{out}", init_checkpoint="", max_iter=2, amp=dict(enabled=False),
             ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
             checkpointer=dict(period=1, max_to_keep=10), eval_period=0, log_period=1, device="cpu",
             clip_grad_norm=5.0)
lr_multiplier = L(WarmupParamScheduler)(scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
                                        warmup_length=0.0, warmup_factor=1.0)
'''


# A 6-image COCO-format split of the built-in shapes data, registered by the config itself (so
# that a tools/lazy_train_net.py process has it too), for training and evaluation.
TINY_DATA = '''
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from d2kd.data.shapes import generate_shapes_split

json_file = "{root}/tiny.json"
if not os.path.isfile(json_file):
    generate_shapes_split("{root}", "tiny", 6, 0)
if MetadataCatalog.get("d2kd_lazy_tiny").get("json_file", None) != json_file:  # another test's
    if "d2kd_lazy_tiny" in DatasetCatalog.list():
        DatasetCatalog.remove("d2kd_lazy_tiny")
        MetadataCatalog.remove("d2kd_lazy_tiny")
    register_coco_instances("d2kd_lazy_tiny", {{}}, json_file, "{root}/tiny")
'''


def write_tiny(tmp_path, name="tiny_vit.py", channels=32, num_classes=3, square_pad=0, model_format="RGB",
               mapper_format="RGB", no_loader=False, data=False):
    fmt = f'input_format="{model_format}",' if model_format else ""
    preamble = TINY_DATA.format(root=tmp_path / "data") if data else ""
    sets = "d2kd_lazy_tiny" if data else "d2kd_shapes_train"
    text = TINY.format(preamble=preamble, channels=channels, num_classes=num_classes, square_pad=square_pad,
                       input_format=fmt, mapper_format=mapper_format, train_set=sets, test_set=sets,
                       out=tmp_path / f"{name}.out")
    if no_loader:
        text = text[: text.index("dataloader = ")]
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def save_lazy(student_cfg, path, seed=1):
    """Build the teacher ``student_cfg`` names (its OPTS applied) with random weights; save it."""
    torch.manual_seed(seed)
    teacher = build_lazy_teacher_model(build_teacher_cfg(student_cfg))
    torch.save({"model": teacher.state_dict()}, path)
    return teacher


def lazy_student(tmp_path, heads=("fitnet",), opts=(), **tiny):
    """The conftest DistillRCNN student (16 channels, 3 classes, BGR) with a tiny ViT teacher (32)."""
    cfg = distill_cfg(tmp_path, heads=heads)
    cfg.DISTILL.TEACHER.CONFIG_FILE = write_tiny(tmp_path, **tiny)
    cfg.DISTILL.TEACHER.OPTS = list(opts)
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "lazy_teacher.pth")
    save_lazy(cfg, cfg.DISTILL.TEACHER.WEIGHTS)
    return cfg


@pytest.mark.parametrize("head", ["fitnet", "pkd"])
def test_a_lazy_vit_teacher_loads_strictly_and_trains_a_step_paired_by_stride(tmp_path, head):
    cfg = lazy_student(tmp_path, heads=[head])
    model = build_model(cfg)
    teacher = model.teacher
    assert type(teacher.backbone).__name__ == "SimpleFeaturePyramid" and model.teacher_kind.name == "two_stage"
    assert isinstance(model.teacher_cfg, LazyTeacherConfig) and model.teacher_cfg.INPUT.FORMAT == "RGB"
    assert model._flip_teacher_channels  # student BGR, teacher RGB
    assert model.common_strides == [4, 8, 16, 32, 64]
    saved = torch.load(cfg.DISTILL.TEACHER.WEIGHTS)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())
    # hidden: in none of the student's parameters, state or submodules
    assert not any(k.startswith(("teacher", "_teacher")) for k in model.state_dict())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}

    model.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.device == model.device for p in teacher.parameters())
    with EventStorage(0):
        losses = model(random_batch(2, size=(64, 80)))
    distill = [k for k in losses if k.startswith(f"loss_distill_{head}")]
    assert distill and all(torch.isfinite(losses[k]) for k in distill)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.distill_heads.parameters())
    assert not teacher.training
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())


def test_a_wrong_or_corrupt_checkpoint_is_refused_as_for_a_yacs_teacher(tmp_path):
    cfg = lazy_student(tmp_path)
    good = cfg.DISTILL.TEACHER.WEIGHTS
    # another model's (a yacs ResNet Faster R-CNN)
    save_plain_model(detector_cfg("rcnn", 16), tmp_path / "resnet.pth")
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "resnet.pth")
    with pytest.raises(TeacherConfigError, match="does not match the model built from DISTILL.TEACHER.CONFIG_FILE") as err:
        build_model(cfg)
    msg = str(err.value)
    assert "missing: backbone.net." in msg and "unexpected: backbone.bottom_up." in msg
    assert "another architecture than the config describes" in msg and len(msg) < 1200
    # the same ViT at another width
    other = cfg.clone()
    other.DISTILL.TEACHER.CONFIG_FILE = write_tiny(tmp_path, name="wide.py", channels=8)
    save_lazy(other, tmp_path / "wide.pth")
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "wide.pth")
    with pytest.raises(TeacherConfigError, match="wrong shape: backbone.simfp_2"):
        build_model(cfg)
    # truncated
    data = open(good, "rb").read()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "truncated.pth")
    with pytest.raises(TeacherConfigError, match="DISTILL.TEACHER.WEIGHTS: could not read .*truncated.pth") as err:
        build_model(cfg)
    assert "corrupt, truncated, or not a checkpoint" in str(err.value)
    assert "teacher's checkpoint again" in str(err.value)
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"DISTILL.TEACHER.WEIGHTS = '.*nope.pth' does not exist"):
        build_model(cfg)
    cfg.DISTILL.TEACHER.WEIGHTS = ""
    with pytest.raises(TeacherConfigError, match="DISTILL.TEACHER.WEIGHTS is empty"):
        build_model(cfg)


def test_opts_are_lazyconfig_overrides_that_reach_the_teacher(tmp_path):
    cfg = lazy_student(tmp_path, opts=["model.roi_heads.box_head.fc_dims=[24]", "model.backbone.net.depth=1"])
    model = build_model(cfg)  # the weights were saved from the overridden config: strict load passes
    assert model.teacher.roi_heads.box_head.fc1.out_features == 24
    assert len(model.teacher.backbone.net.blocks) == 1
    # the class count, with the key to fix named as the LazyConfig's
    cfg.DISTILL.TEACHER.OPTS = ["model.roi_heads.num_classes=5"]
    with pytest.raises(TeacherConfigError, match="teacher predicts 5 classes but the student predicts 3") as err:
        build_model(cfg)
    assert "model.roi_heads.num_classes in its LazyConfig" in str(err.value)


@pytest.mark.parametrize("opts,match", [
    (["MODEL.ROI_HEADS.NUM_CLASSES", "5"], "yacs-style KEY VALUE pairs"),
    (["model.roi_heads.num_clases=5"], "StandardROIHeads, which takes no argument 'num_clases'"),
    (["modle.roi_heads.num_classes=5"], "'modle.roi_heads.num_classes' is not a key"),
])
def test_bad_opts_for_a_lazy_teacher_are_clear_errors(tmp_path, opts, match):
    cfg = distill_cfg(tmp_path)
    cfg.DISTILL.TEACHER.CONFIG_FILE = write_tiny(tmp_path)
    cfg.DISTILL.TEACHER.OPTS = opts
    with pytest.raises(TeacherConfigError, match=match) as err:
        build_teacher_cfg(cfg)
    assert "DISTILL.TEACHER.OPTS" in str(err.value)


def test_an_argument_the_lazycall_takes_can_be_added(tmp_path):
    cfg = distill_cfg(tmp_path)
    cfg.DISTILL.TEACHER.CONFIG_FILE = write_tiny(tmp_path, model_format="", no_loader=True)
    with pytest.raises(TeacherConfigError, match="cannot tell whether it reads RGB or BGR"):
        build_teacher_cfg(cfg)
    cfg.DISTILL.TEACHER.OPTS = ["model.input_format=BGR"]  # not in the file, but GeneralizedRCNN takes it
    assert build_teacher_cfg(cfg).INPUT.FORMAT == "BGR"


def test_input_format_comes_from_the_lazyconfig_and_a_contradiction_is_an_error(tmp_path):
    cfg = distill_cfg(tmp_path)
    cfg.DISTILL.TEACHER.CONFIG_FILE = write_tiny(tmp_path, model_format="", mapper_format="BGR")
    assert build_teacher_cfg(cfg).INPUT.FORMAT == "BGR"  # the training mapper's
    cfg.DISTILL.TEACHER.CONFIG_FILE = write_tiny(tmp_path, name="both.py", model_format="RGB", mapper_format="BGR")
    with pytest.raises(TeacherConfigError, match="image_format = BGR but model.input_format = RGB"):
        build_teacher_cfg(cfg)


def test_a_square_padding_teacher_is_refused_with_the_fix(tmp_path):
    cfg = distill_cfg(tmp_path)
    cfg.DISTILL.TEACHER.CONFIG_FILE = write_tiny(tmp_path, square_pad=128)
    with pytest.raises(TeacherConfigError, match="model.backbone.square_pad=0"):
        build_teacher(cfg)
    cfg.DISTILL.TEACHER.OPTS = ["model.backbone.square_pad=0"]
    assert build_teacher(cfg)[2].name == "two_stage"


def test_a_model_zoo_lazyconfig_name_resolves_and_builds_a_frozen_two_stage_teacher():
    name = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"
    assert resolve_teacher_config_file(name).endswith(os.path.join("configs", name))
    cfg = load_config(os.path.join(SHAPES, "faster_rcnn_R_18_half_FPN_1k_shapes.yaml"))
    cfg.DISTILL.TEACHER.CONFIG_FILE = name
    cfg.DISTILL.TEACHER.OPTS = ["model.roi_heads.num_classes=6"]
    teacher, teacher_cfg, kind = build_teacher(cfg)
    assert (teacher_cfg.INPUT.FORMAT, teacher_cfg.MODEL.META_ARCHITECTURE, kind.name) == ("BGR", "GeneralizedRCNN", "two_stage")
    assert teacher.roi_heads.num_classes == 6 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    # detectron2's own ViTDet model (ViT-B + SimpleFeaturePyramid): square padding refused, then unpadded
    cfg.DISTILL.TEACHER.CONFIG_FILE = "common/models/mask_rcnn_vitdet.py"
    with pytest.raises(TeacherConfigError, match="1024 x 1024 square"):
        build_teacher(cfg)
    cfg.DISTILL.TEACHER.OPTS = ["model.roi_heads.num_classes=6", "model.backbone.square_pad=0"]
    teacher, teacher_cfg, kind = build_teacher(cfg)
    assert (type(teacher.backbone.net).__name__, teacher_cfg.INPUT.FORMAT, kind.name) == ("ViT", "RGB", "two_stage")
    cfg.DISTILL.TEACHER.CONFIG_FILE = "new_baselines/no_such_model.py"
    with pytest.raises(TeacherConfigError, match="neither an existing file nor a detectron2 model-zoo"):
        build_teacher_cfg(cfg)


def test_the_shipped_vit_teacher_and_its_students(tmp_path):
    """configs/shapes/vitdet_*.py: ViT + SimpleFeaturePyramid, p2-p6 at the student's strides, RGB;
    its GK / PKD / FitNet students build with it (random weights), train a step, and distil the
    strides their configs name: PKD its released four (p2-p5), GK and FitNet p2-p4 (the top levels
    collapsed them)."""
    cfg = load_config(os.path.join(SHAPES, "pkd_faster_rcnn_R_18_half_FPN_1k_vitteacher_shapes.yaml"))
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == VIT_TEACHER
    teacher, teacher_cfg, kind = build_teacher(cfg)
    assert type(teacher.backbone.net).__name__ == "ViT" and kind.name == "two_stage"
    assert {k: v.stride for k, v in teacher.backbone.output_shape().items()} == {
        "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert teacher_cfg.INPUT.FORMAT == "RGB" and teacher.roi_heads.num_classes == 6
    weights = str(tmp_path / "vit.pth")
    torch.save({"model": teacher.state_dict()}, weights)
    for method in ("gk", "pkd", "fitnet"):
        cfg = load_config(os.path.join(SHAPES, f"{method}_faster_rcnn_R_18_half_FPN_1k_vitteacher_shapes.yaml"),
                          ["DISTILL.TEACHER.WEIGHTS", weights])
        model = build_model(cfg)
        assert list(model.distill_heads) == [method] and model._flip_teacher_channels
        assert model.common_strides == [4, 8, 16, 32, 64]
        assert model.distill_heads[method].strides == ([4, 8, 16, 32] if method == "pkd" else [4, 8, 16])
        model.train()
        with EventStorage(0):  # one step at the shapes data's 128 px (GK's prototypes come at 250)
            losses = model(random_batch(2, size=(128, 128), num_classes=6))
        distill = {k: v for k, v in losses.items() if k.startswith(f"loss_distill_{method}")}
        assert distill and all(torch.isfinite(v) for v in distill.values()), losses
        sum(losses.values()).backward()
        assert all(p.grad is None for p in model.teacher.parameters())


def test_lazy_train_net_trains_two_iterations_resumes_and_evaluates(tmp_path):
    from detectron2.engine import default_argument_parser

    from d2kd import lazy_train_net

    config = write_tiny(tmp_path, num_classes=6, data=True)
    out = tmp_path / "tiny_vit.py.out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    # the command line, as documented (without the evaluation at the end)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "lazy_train_net.py"), "--config-file", config,
                           "dataloader.evaluator=null"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").read_text() == "model_final.pth"
    saved = torch.load(out / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 1 and "optimizer" in saved["trainer"] and "model" in saved
    iters = [json.loads(l)["iteration"] for l in (out / "metrics.json").read_text().splitlines()]
    assert iters == [0, 1]

    args = default_argument_parser().parse_args(["--config-file", config, "--resume", "train.max_iter=3"])
    results = lazy_train_net.main(args)  # resumes at iteration 2, trains it, evaluates
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 2
    iters = [json.loads(l)["iteration"] for l in (out / "metrics.json").read_text().splitlines()]
    assert iters[:2] == [0, 1] and 2 in iters[2:]
    assert "AP" in results["bbox"]

    args = default_argument_parser().parse_args(
        ["--config-file", config, "--eval-only", f"train.init_checkpoint={out / 'model_final.pth'}"])
    assert lazy_train_net.main(args)["bbox"].keys() == results["bbox"].keys()
    args = default_argument_parser().parse_args(["--config-file", config, "--eval-only"])
    with pytest.raises(ValueError, match="train.init_checkpoint="):
        lazy_train_net.main(args)
    with pytest.raises(ValueError, match="not yacs-style KEY VALUE pairs"):
        lazy_train_net.load_lazy_config(config, ["train.max_iter", "3"])


def test_a_lazyconfig_stage_trains_evaluates_and_is_reused_as_the_yacs_stages(tmp_path):
    from d2kd.engine.experiment import stage_results
    from d2kd.lazy_train_net import train_and_evaluate_lazy

    config = write_tiny(tmp_path, num_classes=6, data=True)
    stage = str(tmp_path / "teacher_seed0")
    # with train.amp (bfloat16 autocast on CPU, d2kd's DistillAMPTrainer)
    bbox = train_and_evaluate_lazy(config, stage, ["train.max_iter=1", "train.seed=0", "train.amp.enabled=True"])
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (NaN APs)
    assert "AP" in bbox and same(stage_results(stage), bbox)
    assert os.path.isfile(os.path.join(stage, "model_final.pth"))
    assert os.path.isfile(os.path.join(stage, "train_time.json"))
    before = os.path.getmtime(os.path.join(stage, "model_final.pth"))
    assert same(train_and_evaluate_lazy(config, stage, ["train.max_iter=1"]), bbox)  # reused, not retrained
    assert os.path.getmtime(os.path.join(stage, "model_final.pth")) == before


def test_gk_builds_prototypes_from_a_lazy_vit_teacher_and_trains(tmp_path):
    """GK's prototype build (the teacher's backbone on the sampled images) and its three terms
    with a ViT + SimpleFeaturePyramid teacher, through DistillTrainer, on a 6-image split."""
    from d2kd.engine import DistillTrainer

    cfg = distill_cfg(tmp_path, heads=["gk"], num_classes=6)
    cfg.DISTILL.TEACHER.CONFIG_FILE = write_tiny(tmp_path, num_classes=6, data=True)
    cfg.DISTILL.TEACHER.WEIGHTS = str(tmp_path / "lazy_teacher.pth")
    save_lazy(cfg, cfg.DISTILL.TEACHER.WEIGHTS)  # loading the LazyConfig registers d2kd_lazy_tiny
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("d2kd_lazy_tiny",), ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 2, 0.001, 2
    cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = (), 0, 100
    cfg.DISTILL.GK.FEATURE_WEIGHT = 1e-6
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES, cfg.DISTILL.PROTOTYPES.MIN_SIZE = 4, 4
    cfg.DISTILL.PROTOTYPES.NUM, cfg.DISTILL.PROTOTYPES.START_ITER, cfg.DISTILL.PROTOTYPES.PERIOD = 2, 1, 0
    cfg.OUTPUT_DIR = str(tmp_path / "gk_out")
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    bank = trainer.model.prototype_bank
    assert bank.num_builds.item() == 1 and any(bank.state_dict()[f"valid_s{s}"].any() for s in (4, 8, 16, 32, 64)
                                               if f"valid_s{s}" in bank.state_dict())
    losses = {k for k in trainer.storage.histories() if k.startswith("loss_distill_gk")}
    assert {"loss_distill_gk_global", "loss_distill_gk_fg", "loss_distill_gk_bg", "loss_distill_gk_response"} <= losses
    assert trainer.storage.history("loss_distill_gk_global").latest() > 0  # iteration 1, after the build
    assert not trainer.model.teacher.training
