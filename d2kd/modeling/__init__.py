from . import basic_resnet  # noqa: F401  (registers the backbones)
from .distill_mixin import DistillMixin
from .distill_rcnn import DistillRCNN
from .distill_retinanet import DistillRetinaNet
from .gfl import GFL, GFL_KIND  # registers GFL; its kind goes before DENSE in KINDS
from .distill_gfl import DistillGFL
from .kinds import DENSE, TWO_STAGE, DetectorKind, kind_of

__all__ = [
    "DistillMixin", "DistillRCNN", "DistillRetinaNet", "DistillGFL", "GFL", "DetectorKind", "DENSE",
    "GFL_KIND", "TWO_STAGE", "kind_of",
]
