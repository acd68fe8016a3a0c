"""ResNet-18/34 (BasicBlock) backbones of any width, with FPN.

detectron2's ``build_resnet_backbone`` pins R-18/34 at ``RES2_OUT_CHANNELS = 64``; small
students (the built-in demo's, or mobile-sized ones) need narrower ones. These builders honour
``MODEL.RESNETS.RES2_OUT_CHANNELS`` (doubled at each stage) and otherwise read the same keys.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem


def build_basic_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in (18, 34):
        raise ValueError(f"basic-block ResNets are 18 or 34 layers deep; MODEL.RESNETS.DEPTH is {depth}")
    norm = cfg.MODEL.RESNETS.NORM
    stem = BasicStem(input_shape.channels, cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, norm=norm)
    in_channels, out_channels = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
    stages = []
    for idx, num_blocks in enumerate({18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]):
        first_stride = 1 if idx == 0 else 2
        stages.append(ResNet.make_stage(
            block_class=BasicBlock, num_blocks=num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels, out_channels=out_channels, norm=norm,
        ))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=cfg.MODEL.RESNETS.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def _fpn(cfg, bottom_up, top_block):
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_basic_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """R-18/34 of width RES2_OUT_CHANNELS + FPN with P6 by max-pooling (Faster R-CNN's p2-p6)."""
    return _fpn(cfg, build_basic_resnet(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_basic_resnet_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """R-18/34 of width RES2_OUT_CHANNELS + FPN with P6/P7 from P5 (RetinaNet's p3-p7)."""
    out = cfg.MODEL.FPN.OUT_CHANNELS
    return _fpn(cfg, build_basic_resnet(cfg, input_shape), LastLevelP6P7(out, out, "p5"))
