"""DistillRetinaNet: a RetinaNet student that learns from a frozen teacher."""
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet

from .distill_mixin import DistillMixin
from .kinds import DENSE


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillMixin, RetinaNet):
    """RetinaNet student + frozen teacher + distillation heads.

    The student trains through RetinaNet's own ``forward``; forward hooks record its FPN
    features, head outputs and anchors, and ``label_anchors`` (RetinaNet's documented hook
    point) records the anchor labels its losses use. At inference it is the student alone.
    """

    plain_meta_arch = "RetinaNet"
    kind = DENSE

    def label_anchors(self, anchors, gt_instances):
        gt_labels, matched_boxes = super().label_anchors(anchors, gt_instances)
        self._recorder.put("dense.anchor_labels", torch.stack(gt_labels))
        return gt_labels, matched_boxes
