"""d2kd: knowledge distillation for object detectors, as a detectron2 extension.

Importing the package registers everything: the meta-architectures ``DistillRCNN`` and
``DistillRetinaNet`` in detectron2's ``META_ARCH_REGISTRY``, the distillation heads in
``DISTILL_HEAD_REGISTRY``, the built-in ``d2kd_shapes_*`` datasets and the ``d2kd://`` prefix of
d2kd's model zoo (``d2kd.model_zoo``).
"""
from .config import add_distill_config
from . import heads  # noqa: F401  (registers the heads)
from . import modeling  # noqa: F401  (registers the meta-architectures)
from . import data  # noqa: F401  (registers the built-in datasets)
from . import model_zoo  # noqa: F401  (registers the d2kd:// prefix with detectron2's PathManager)
from .heads import DISTILL_HEAD_REGISTRY

__all__ = ["add_distill_config", "DISTILL_HEAD_REGISTRY"]
