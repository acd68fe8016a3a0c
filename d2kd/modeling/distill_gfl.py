"""DistillGFL: a GFL student that learns from a frozen teacher."""
import torch
from detectron2.modeling import META_ARCH_REGISTRY

from .distill_mixin import DistillMixin
from .gfl import GFL, GFL_KIND


@META_ARCH_REGISTRY.register()
class DistillGFL(DistillMixin, GFL):
    """GFL student + frozen teacher + distillation heads.

    The student trains through GFL's own ``forward``; forward hooks record its FPN features,
    head outputs (class logits and per-edge box distributions) and anchors, and
    ``label_anchors`` (GFL's hook point) records the ATSS labels and the GT box each positive
    anchor is assigned to. Its kind offers ``box_distribution`` (the LD head needs it on both
    sides). At inference it is the student alone; it exports as a plain GFL.
    """

    plain_meta_arch = "GFL"
    kind = GFL_KIND

    def label_anchors(self, anchors, gt_instances):
        gt_labels, matched_gt = super().label_anchors(anchors, gt_instances)
        self._recorder.put("dense.anchor_labels", torch.stack(gt_labels))
        self._recorder.put("dense.anchor_matched_gt", torch.stack(matched_gt))
        return gt_labels, matched_gt
