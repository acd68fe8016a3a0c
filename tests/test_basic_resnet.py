"""The narrow ResNet-18/34 + FPN backbones used by small students."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from conftest import detector_cfg


@pytest.mark.parametrize("name,strides", [
    ("build_basic_resnet_fpn_backbone", [4, 8, 16, 32, 64]),
    ("build_basic_resnet_retinanet_fpn_backbone", [8, 16, 32, 64, 128]),
])
def test_width_follows_res2_out_channels(name, strides):
    cfg = detector_cfg("rcnn" if "retinanet" not in name else "retinanet", fpn_channels=8)
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert [s.stride for s in backbone.output_shape().values()] == strides
    assert backbone.bottom_up.res2[0].conv1.out_channels == 16
    assert backbone.bottom_up.res5[0].conv1.out_channels == 128
    out = backbone(torch.rand(1, 3, 64, 64))
    assert all(x.shape[1] == 8 for x in out.values())


def test_bottleneck_depths_are_refused():
    cfg = detector_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_basic_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    with pytest.raises(ValueError, match="18 or 34 layers deep"):
        build_backbone(cfg, ShapeSpec(channels=3))
