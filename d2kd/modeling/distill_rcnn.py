"""DistillRCNN: a GeneralizedRCNN student that learns from a frozen teacher."""
from typing import Dict, List

import torch
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.utils.events import get_event_storage

from .distill_mixin import DistillMixin


@META_ARCH_REGISTRY.register()
class DistillRCNN(DistillMixin, GeneralizedRCNN):
    """Faster / Mask R-CNN student + frozen teacher + distillation heads.

    At inference it is the student alone: ``forward`` in eval mode is GeneralizedRCNN's.
    In training it runs the student exactly as GeneralizedRCNN does, and additionally exposes
    to every head the FPN features of both models, the student's sampled RoIs and both
    models' box-head outputs on those same RoIs (see :class:`DistillContext`).
    """

    student_kind = "rcnn"

    def check_student(self):
        if type(self.roi_heads) is not StandardROIHeads or self.roi_heads.train_on_pred_boxes:
            # The training step below re-runs StandardROIHeads' box branch to keep its outputs;
            # cascades and predicted-box training would need their own path.
            raise NotImplementedError(
                f"DistillRCNN supports MODEL.ROI_HEADS.NAME 'StandardROIHeads' without "
                f"TRAIN_ON_PRED_BOXES as the student; got {type(self.roi_heads).__name__}"
            )

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return self.inference(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError("DistillRCNN needs 'instances' (GT annotations) in training")

        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, losses = self.proposal_generator(images, features, gt_instances)

        # StandardROIHeads.forward(training), unrolled to keep the sampled RoIs and predictions.
        roi_heads = self.roi_heads
        sampled = roi_heads.label_and_sample_proposals(proposals, gt_instances)
        box_features = roi_heads.box_pooler(
            [features[f] for f in roi_heads.box_in_features], [p.proposal_boxes for p in sampled]
        )
        scores, deltas = roi_heads.box_predictor(roi_heads.box_head(box_features))
        del box_features
        losses.update(roi_heads.box_predictor.losses((scores, deltas), sampled))
        losses.update(roi_heads._forward_mask(features, sampled))
        losses.update(roi_heads._forward_keypoint(features, sampled))
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)

        if not self.distillation_active(get_event_storage().iter):
            losses.update(self.idle_distill_losses())
            return losses

        ctx, teacher_features = self.make_context(
            batched_inputs, images, features, gt_instances,
            num_classes=roi_heads.num_classes,
            proposals=sampled,
            student_roi_logits=scores,
            student_roi_deltas=deltas,
        )
        if "roi" in self._teacher_needs:
            ctx.teacher_roi_logits, ctx.teacher_roi_deltas = self.teacher_roi_outputs(
                teacher_features, sampled
            )
        losses.update(self.distill_losses(ctx))
        return losses

