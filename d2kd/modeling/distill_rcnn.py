"""DistillRCNN: a GeneralizedRCNN student that learns from a frozen teacher."""
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from .box_head_on import is_cascade
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

    def _init_distill(self, setup):
        if is_cascade(self.roi_heads):
            # its box predictions are per stage (a ModuleList): the RoI hooks record none of them
            raise ValueError(
                "a Cascade R-CNN student (MODEL.ROI_HEADS.NAME CascadeROIHeads) is not supported: "
                "d2kd distils Faster R-CNN students, from any R-CNN teacher including a cascade. "
                "Use StandardROIHeads for the student"
            )
        super()._init_distill(setup)
