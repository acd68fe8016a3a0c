from . import basic_resnet  # noqa: F401  (registers the backbones)
from .distill_mixin import DistillMixin
from .distill_rcnn import DistillRCNN
from .distill_retinanet import DistillRetinaNet
from .kinds import DENSE, TWO_STAGE, DetectorKind, kind_of

__all__ = ["DistillMixin", "DistillRCNN", "DistillRetinaNet", "DetectorKind", "DENSE", "TWO_STAGE", "kind_of"]
