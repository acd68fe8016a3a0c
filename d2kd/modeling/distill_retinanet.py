"""DistillRetinaNet: a RetinaNet student that learns from a frozen teacher."""
from typing import Dict, List

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import get_event_storage

from .distill_mixin import DistillMixin, dense_by_stride


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillMixin, RetinaNet):
    """RetinaNet student + frozen teacher + distillation heads.

    At inference it is the student alone. In training it runs RetinaNet's losses unchanged and
    exposes to every head both models' FPN features, the anchors, the anchor-to-GT matching
    and (when a head asks for them) both models' per-anchor class logits and box outputs.
    """

    student_kind = "dense"

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return super().forward(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError("DistillRetinaNet needs 'instances' (GT annotations) in training")

        images = self.preprocess_image(batched_inputs)
        named_features = self.backbone(images.tensor)
        features = [named_features[f] for f in self.head_in_features]
        logits, box_reg = self.head(features)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]

        # RetinaNet.forward_training, with the anchor matching kept for the heads.
        pred_logits, pred_deltas = self._transpose_dense_predictions([logits, box_reg], [self.num_classes, 4])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes, gt_index = self.label_anchors_with_index(anchors, gt_instances)
        losses = self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)

        if not self.distillation_active(get_event_storage().iter):
            losses.update(self.idle_distill_losses())
            return losses

        strides = [self.backbone.output_shape()[f].stride for f in self.head_in_features]
        ctx, teacher_features = self.make_context(
            batched_inputs, images, named_features, gt_instances,
            num_classes=self.num_classes,
            anchors=dict(zip(strides, anchors)),
            anchor_gt_labels=torch.stack(gt_labels),
            anchor_gt_index=torch.stack(gt_index),
        )
        ctx.student_cls_logits, ctx.student_box_reg = dense_by_stride(self, logits, box_reg)
        if "anchors" in self._teacher_needs:
            ctx.teacher_cls_logits, ctx.teacher_box_reg = self.teacher_dense_outputs(teacher_features)
        losses.update(self.distill_losses(ctx))
        return losses

    @torch.no_grad()
    def label_anchors_with_index(self, anchors: List[Boxes], gt_instances):
        """RetinaNet.label_anchors, also returning each anchor's matched GT index.

        Returns:
            gt_labels (list[Tensor]): per image (R,), class, C for background, -1 ignored.
            gt_boxes (list[Tensor]): per image (R, 4), matched GT box (undefined unless fg).
            gt_index (list[Tensor]): per image (R,), matched GT index, -1 unless foreground.
        """
        anchors = Boxes.cat(anchors)
        labels, boxes, indices = [], [], []
        for gts in gt_instances:
            matched, anchor_labels = self.anchor_matcher(pairwise_iou(gts.gt_boxes, anchors))
            if len(gts) > 0:
                box = gts.gt_boxes.tensor[matched]
                label = gts.gt_classes[matched]
                label[anchor_labels == 0] = self.num_classes
                label[anchor_labels == -1] = -1
                index = torch.where(anchor_labels == 1, matched, torch.full_like(matched, -1))
            else:
                box = torch.zeros_like(anchors.tensor)
                label = torch.full_like(matched, self.num_classes)
                index = torch.full_like(matched, -1)
            labels.append(label)
            boxes.append(box)
            indices.append(index)
        return labels, boxes, indices
