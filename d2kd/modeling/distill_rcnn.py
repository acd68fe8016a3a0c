"""DistillRCNN: a GeneralizedRCNN student that learns from a frozen teacher."""
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from .distill_mixin import DistillMixin
from .kinds import TWO_STAGE


@META_ARCH_REGISTRY.register()
class DistillRCNN(DistillMixin, GeneralizedRCNN):
    """Faster / Mask R-CNN student + frozen teacher + distillation heads.

    The student trains through GeneralizedRCNN's own ``forward``; forward hooks record its
    FPN features, RPN outputs, sampled RoIs and box-head outputs for the heads. At inference
    it is the student alone.
    """

    plain_meta_arch = "GeneralizedRCNN"
    kind = TWO_STAGE
