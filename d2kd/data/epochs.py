"""Epochs of ``DATASETS.TRAIN`` counted in iterations, for schedules given in epochs.

An epoch is the training set as detectron2's training loader sees it (the images of
``DATASETS.TRAIN`` left after its filtering: ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` and the
keypoint minimum) divided by ``SOLVER.IMS_PER_BATCH``, the global batch. Sampler repeat
factors (``RepeatFactorTrainingSampler``) are not counted: an epoch is every image once.
"""
import math
from typing import List

from detectron2.data import get_detection_dataset_dicts


def training_dataset(cfg) -> List[dict]:
    """``DATASETS.TRAIN`` filtered as ``build_detection_train_loader`` filters it."""
    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
    )


def iterations_per_epoch(num_images: int, ims_per_batch: int) -> float:
    """Iterations one pass over ``num_images`` takes at ``ims_per_batch`` images per step."""
    if ims_per_batch < 1:
        raise ValueError(f"SOLVER.IMS_PER_BATCH = {ims_per_batch}: it must be at least 1")
    return num_images / ims_per_batch


def epochs_to_iterations(epochs: float, num_images: int, ims_per_batch: int) -> int:
    """``epochs`` in whole iterations, rounded up (one epoch sees every image at least once)."""
    # round first: 0.3 * 1000 / 4 is 75.00000000000001 in floating point, and means 75
    return math.ceil(round(epochs * iterations_per_epoch(num_images, ims_per_batch), 6))
