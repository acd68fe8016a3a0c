"""A teacher's box head on given boxes (the ``teacher.box_head`` capability), for plain and
Cascade R-CNN ROI heads.

A plain ``StandardROIHeads`` pools the boxes and runs its box head and predictor once. A
``CascadeROIHeads`` (Cascade R-CNN, the GK paper's larger teacher) is a chain: stage k pools
the boxes stage k-1 predicted, and its inference score is the mean of the stages' class
probabilities, its box the last stage's. Heads that read class logits on the student's RoIs
(KD, GK's response term, DeFeat) get by default what the cascade itself predicts at inference
for those RoIs taken as its proposals, expressed as logits: ``log(mean_k p_k)``, whose softmax
is the cascade's score exactly (at a temperature T, ``softmax(log p / T)`` is the tempered
mean). ``DISTILL.TEACHER.CASCADE_STAGE k`` gives stage k's own logits instead, on the boxes
that stage sees in the chain.
"""
from typing import Dict, List, Tuple

import torch
from detectron2.modeling.roi_heads.cascade_rcnn import CascadeROIHeads
from detectron2.structures import Boxes, Instances
from torch import Tensor

# the mean probability is clamped here before its log (a class the cascade rules out entirely)
_MIN_PROBABILITY = 1e-12


def is_cascade(roi_heads) -> bool:
    return isinstance(roi_heads, CascadeROIHeads)


def check_cascade_stage(roi_heads, stage: int) -> None:
    """``DISTILL.TEACHER.CASCADE_STAGE`` must be -1 or a stage of this teacher."""
    if stage == -1:
        return
    if not is_cascade(roi_heads):
        raise ValueError(
            f"DISTILL.TEACHER.CASCADE_STAGE is {stage}, but the teacher's ROI heads "
            f"({type(roi_heads).__name__}) are not a cascade: set it to -1"
        )
    if not 0 <= stage < roi_heads.num_cascade_stages:
        raise ValueError(
            f"DISTILL.TEACHER.CASCADE_STAGE is {stage}, but the teacher's cascade has "
            f"{roi_heads.num_cascade_stages} stages: give -1 (the mean of their probabilities, "
            f"its inference score) or 0..{roi_heads.num_cascade_stages - 1}"
        )


def box_head_on(roi_heads, features: Dict[str, Tensor], boxes: List[Boxes],
                image_sizes: List[Tuple[int, int]], cascade_stage: int = -1) -> Tuple[Tensor, Tensor]:
    """Class logits ``(R, C + 1)`` and box deltas on ``boxes`` (R over the batch, in order).

    For a cascade the deltas encode its final boxes (the last stage's, as at inference) relative
    to the given boxes with the last stage's box transform, so decoding them on ``boxes`` gives
    those final boxes.
    """
    in_features = [features[f] for f in roi_heads.box_in_features]
    if not is_cascade(roi_heads):
        x = roi_heads.box_pooler(in_features, boxes)
        return roi_heads.box_predictor(roi_heads.box_head(x))
    check_cascade_stage(roi_heads, cascade_stage)
    proposals = []
    for b, size in zip(boxes, image_sizes):
        p = Instances(size)
        p.proposal_boxes = b
        proposals.append(p)
    probabilities, stage_logits, predictions, predictor = [], [], None, None
    # the chain of CascadeROIHeads._forward_box at inference, one stage after another
    for k in range(roi_heads.num_cascade_stages):
        if k > 0:
            proposals = roi_heads._create_proposals_from_boxes(
                predictor.predict_boxes(predictions, proposals), image_sizes)
        predictor = roi_heads.box_predictor[k]
        predictions = roi_heads._run_stage(in_features, proposals, k)
        stage_logits.append(predictions[0])
        probabilities.append(torch.cat(predictor.predict_probs(predictions, proposals)))
    final = torch.cat(predictor.predict_boxes(predictions, proposals))
    start = torch.cat([b.tensor for b in boxes])
    # class-agnostic (the cascade's default) or per class: encode every box column the same way
    columns = final.shape[1] // 4
    deltas = predictor.box2box_transform.get_deltas(
        start.repeat_interleave(columns, dim=0), final.reshape(-1, 4)).reshape(final.shape)
    if cascade_stage >= 0:
        return stage_logits[cascade_stage], deltas
    mean = torch.stack(probabilities).mean(dim=0)
    return mean.clamp_min(_MIN_PROBABILITY).log(), deltas
