from . import basic_resnet  # noqa: F401  (registers the backbones)
from .context import DistillContext
from .distill_rcnn import DistillRCNN
from .distill_retinanet import DistillRetinaNet

__all__ = ["DistillContext", "DistillRCNN", "DistillRetinaNet"]
