# A small ViTDet-style teacher on the built-in d2kd_shapes data, as a detectron2 LazyConfig:
# detectron2's ViT (width 192 as ViT-Ti, 6 blocks, 3 heads, patch 8, windowed attention of
# 4 x 4 tokens with blocks 2 and 5 global, relative positions) feeding a SimpleFeaturePyramid
# (p2-p6, strides 4-64, 64 channels as the CNN teacher's FPN), and the Faster R-CNN head of
# detectron2's ViTDet configs without the mask head (2-conv RPN head, 4conv1fc box head with LN).
# Anchors, sampling, image size and class count are configs/shapes/Base-RCNN-FPN-shapes.yaml's.
#
# Train it (2 CPU cores; see README "LazyConfig teachers"):
#   python tools/lazy_train_net.py --config-file configs/shapes/vitdet_faster_rcnn_ViT_tiny_SFP_2k_shapes.py \
#       train.output_dir=output/shapes/vitdet_teacher
# and distil it with configs/shapes/*_faster_rcnn_R_18_half_FPN_1k_vitteacher_shapes.yaml.
#
# 2000 iterations (as the one-stage teachers): a ViT from scratch on 1000 images converges
# more slowly than the ResNet-18 teacher's 1000. The optimizer (AdamW, lr 3e-4, weight decay
# 0.05, no layer decay: nothing is pretrained) is a first choice, not a tuned one.
#
# Patch 8, not ViTDet's 16: a 128 px image is then 16 x 16 tokens, not 8 x 8 (with patch 16
# the objects, 12-64 px, were one to four tokens wide, and the teacher reached 7.9 AP, below
# the student alone; with patch 8, 27.8 AP, above the CNN teachers). SimpleFeaturePyramid has
# no 1/4 scale, so its scales 2, 1, 1/2 give p2-p4 (strides 4-16) and detectron2's
# LastLevelP6P7 top block (two stride-2 convolutions from p4) gives p5 and p6 (strides 32,
# 64): the same five levels as the students.
from functools import partial

import detectron2.data.transforms as T
import torch
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import SimpleFeaturePyramid, ViT
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import LastLevelP6P7
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

IMAGE_SIZE = 128  # the shapes images are generated at 128 px: no resizing
CHANNELS = 64

model = L(GeneralizedRCNN)(
    backbone=L(SimpleFeaturePyramid)(
        net=L(ViT)(
            img_size=IMAGE_SIZE,
            patch_size=8,
            embed_dim=192,
            depth=6,
            num_heads=3,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=0.1,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            window_size=4,
            window_block_indexes=[0, 1, 3, 4],  # 2 and 5 attend globally
            residual_block_indexes=[],
            use_rel_pos=True,
            out_feature="last_feat",
        ),
        in_feature="${.net.out_feature}",
        out_channels=CHANNELS,
        scale_factors=(2.0, 1.0, 0.5),
        top_block=L(LastLevelP6P7)(in_channels=CHANNELS, out_channels=CHANNELS, in_feature="p4"),
        norm="LN",
        # ViTDet pads to a fixed square; here (and for any d2kd teacher) only to the size
        # divisibility, as the student does, so both models' maps have the same size
        square_pad=0,
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=CHANNELS, num_anchors=3, conv_dims=[-1, -1]),
        anchor_generator=L(DefaultAnchorGenerator)(
            # objects are 12-64 px in 128 px images (Base-RCNN-FPN-shapes.yaml)
            sizes=[[12], [24], [48], [96], [192]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=64,
        positive_fraction=0.5,
        pre_nms_topk=(512, 512),
        post_nms_topk=(256, 256),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=6,
        batch_size_per_image=64,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        box_head=L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=CHANNELS, height=7, width=7),
            conv_dims=[CHANNELS] * 4,
            fc_dims=[256],
            conv_norm="LN",
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=256),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
        ),
    ),
    # ViTDet's ImageNet RGB statistics (unit variance, as the shapes CNNs' BGR ones)
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="d2kd_shapes_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(IMAGE_SIZE,), max_size=IMAGE_SIZE, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
    ),
    total_batch_size=4,
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="d2kd_shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")

optimizer = L(torch.optim.AdamW)(
    # params.model is set to the built model by tools/lazy_train_net.py
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=3e-4,
    betas=(0.9, 0.999),
    weight_decay=0.05,
)

train = dict(
    output_dir="./output/shapes/vitdet_faster_rcnn_ViT_tiny_SFP_2k_shapes",
    init_checkpoint="",  # from scratch, as every shapes model
    max_iter=2000,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=200, max_to_keep=100),
    eval_period=0,  # evaluated once, at the end
    log_period=20,
    device="cpu",
    # d2kd's: clip the gradients' global L2 norm (Base-RCNN-FPN-shapes.yaml's CLIP_VALUE 5)
    clip_grad_norm=5.0,
    seed=-1,
)

# linear warm-up over 50 iterations from 0.001, then cosine to 0 (WarmupCosineLR, as the CNNs)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=50 / train["max_iter"],
    warmup_factor=0.001,
)
