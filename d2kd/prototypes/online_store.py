"""Online instance features: what the training steps already computed, kept for PGM.

GK's paper refreshes its prototypes from a fixed subset of training images (up to 800 per
class), re-extracting the student's features of every one at each refresh (docs/METHODS.md
1.2-1.3). With ``DISTILL.PROTOTYPES.SOURCE "online"`` a build instead selects from an
:class:`OnlineInstanceStore`: at every distillation step the student's and the teacher's FPN
maps of the step (both computed by the step anyway) are pooled at the step's GT boxes
(:func:`~d2kd.prototypes.instance_features.instance_features_by_masks`, the same pooling and
``MIN_SIZE`` rule as the paper's refresh) and written into a per-class ring of
``ONLINE_CAPACITY`` instances at every stride of the bank, so a build re-extracts nothing.
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .instance_features import box_cell_weights_per_stride, instance_features_by_masks

logger = logging.getLogger(__name__)

__all__ = ["OnlineInstanceStore", "step_instances", "record_step_instances"]

# float16 keeps the store (in every checkpoint) at half the size; values beyond its range
# are clamped to it, NaN stays NaN (a build reports it).
_FP16_MAX = 65504.0


class OnlineInstanceStore(nn.Module):
    """A bounded store of (student, teacher) instance features per class and stride.

    Buffers (saved in checkpoints with the bank that holds the store, restored on resume):
    ``student_s{s}`` (C, M, D_s) and ``teacher_s{s}`` (C, M, D_t) float16, ``source`` (C, M, 5)
    (image id or -1, box x1 y1 x2 y2 in original-image pixels), ``iteration`` (C, M) (the
    step that saw the instance, -1 for an empty slot), ``head`` (C,) the next slot to write
    and ``count`` (C,) the slots filled. Every instance is pooled at every stride, so the
    slots of a class mean the same instance at every stride.

    Each class is a ring of M = ``capacity`` slots: once full, a new instance replaces the
    class's oldest one, so the store holds each class's latest M instances (a rare class keeps
    older ones longer). Memory: C * M * (sum over strides of D_s + D_t) * 2 bytes.

    In distributed training every rank adds the instances of all ranks' batches, in rank
    order (:meth:`add` gathers them), so the stores are identical on every rank at every step.
    """

    def __init__(self, strides: List[int], student_channels: Dict[int, int],
                 teacher_channels: Dict[int, int], num_classes: int, capacity: int, min_size: float):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"DISTILL.PROTOTYPES.ONLINE_CAPACITY must be >= 1, got {capacity}")
        self.strides = sorted(strides)
        self.num_classes = num_classes
        self.capacity = int(capacity)
        self.min_size = float(min_size)
        for s in self.strides:
            self.register_buffer(f"student_s{s}", torch.zeros(num_classes, capacity, student_channels[s],
                                                              dtype=torch.float16))
            self.register_buffer(f"teacher_s{s}", torch.zeros(num_classes, capacity, teacher_channels[s],
                                                              dtype=torch.float16))
        self.register_buffer("source", torch.full((num_classes, capacity, 5), -1.0))
        self.register_buffer("iteration", torch.full((num_classes, capacity), -1, dtype=torch.long))
        self.register_buffer("head", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # All or nothing, as the bank: a store of another capacity, strides or channels (or
        # none, from a run with SOURCE "images") is left empty, never half-loaded.
        own = list(self._buffers.items())
        fits = all(prefix + name in state_dict and tuple(state_dict[prefix + name].shape) == tuple(buf.shape)
                   for name, buf in own)
        if fits:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                 missing_keys, unexpected_keys, error_msgs)
        for name, _ in own:
            if prefix + name not in missing_keys:
                missing_keys.append(prefix + name)
        self.clear()
        if any(k.startswith(prefix) for k in state_dict):
            logger.warning(
                "The checkpoint's online instance store does not fit this one (DISTILL.PROTOTYPES."
                "ONLINE_CAPACITY or STRIDES, the classes or the channels differ): it is left empty "
                "and fills again from the next training steps")

    def student(self, stride: int) -> Tensor:
        return getattr(self, f"student_s{stride}")

    def teacher(self, stride: int) -> Tensor:
        return getattr(self, f"teacher_s{stride}")

    def __len__(self) -> int:
        return int(self.count.sum())

    @torch.no_grad()
    def clear(self) -> None:
        for name, buf in self._buffers.items():
            buf.fill_(-1 if name in ("source", "iteration") else 0)

    # ---- adding a step's instances ----
    @torch.no_grad()
    def add(self, classes: Tensor, student: Dict[int, Tensor], teacher: Dict[int, Tensor],
            source: Tensor, iteration: int, gather: bool = True) -> None:
        """Write one step's instances (all ranks' when distributed) into the rings.

        Args:
            classes (Tensor): (m,) int64 class of each instance.
            student, teacher (dict[int, Tensor]): stride -> (m, D_s) / (m, D_t) features.
            source (Tensor): (m, 5) image id (or -1) and box in original-image pixels.
            iteration (int): the step.
            gather (bool): in distributed training, add every rank's instances (a collective:
                all ranks must call it at the same step).
        """
        rows = self._pack(classes, student, teacher, source)
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rows = _all_gather_rows(rows)
        if rows.shape[0] == 0:
            return
        self._write(rows, iteration)

    def _pack(self, classes, student, teacher, source) -> Tensor:
        # one (m, 1 + 5 + sum D) float32 matrix, so a step costs one gather
        parts = [classes.to(self.head.device, torch.float32)[:, None], source.to(self.head.device, torch.float32)]
        for s in self.strides:
            parts.append(student[s].to(self.head.device, torch.float32))
            parts.append(teacher[s].to(self.head.device, torch.float32))
        return torch.cat(parts, dim=1)

    def _write(self, rows: Tensor, iteration: int) -> None:
        classes = rows[:, 0].long()
        m = classes.numel()
        # rank of each instance among the earlier ones of its class (stable: batch order)
        order = torch.sort(classes, stable=True).indices
        sorted_classes = classes[order]
        per_class = torch.bincount(classes, minlength=self.num_classes)
        first = torch.cumsum(per_class, 0) - per_class
        rank = torch.empty_like(classes)
        rank[order] = torch.arange(m, device=classes.device) - first[sorted_classes]
        # a class with more than M new instances keeps its last M (no slot written twice)
        keep = rank >= per_class[classes] - self.capacity
        slot = (self.head[classes] + rank) % self.capacity
        c, j, r = classes[keep], slot[keep], rows[keep]
        self.source[c, j] = r[:, 1:6]
        self.iteration[c, j] = int(iteration)
        col = 6
        for s in self.strides:
            for buf in (self.student(s), self.teacher(s)):
                d = buf.shape[2]
                buf[c, j] = r[:, col:col + d].clamp(-_FP16_MAX, _FP16_MAX).to(buf.dtype)
                col += d
        self.head.copy_((self.head + per_class) % self.capacity)
        self.count.copy_(torch.clamp(self.count + per_class, max=self.capacity))

    # ---- reading for a build ----
    def feature_sets(self) -> Dict[int, Dict[int, Tuple[Tensor, Tensor, Tensor]]]:
        """The stored instances as the refresh's feature sets: {stride: {class: (student
        (n, D_s), teacher (n, D_t), source (n, 5))}} in float32 on the CPU, each class oldest
        first (the same on every rank); classes without instances are absent."""
        out: Dict[int, Dict[int, Tuple[Tensor, Tensor, Tensor]]] = {s: {} for s in self.strides}
        count, head = self.count.cpu(), self.head.cpu()
        source = self.source.cpu()
        for c in range(self.num_classes):
            n = int(count[c])
            if n == 0:
                continue
            # oldest first: a full ring starts at its head, a filling one at 0
            start = int(head[c]) if n == self.capacity else 0
            idx = (torch.arange(n) + start) % self.capacity
            for s in self.strides:
                out[s][c] = (self.student(s)[c].cpu()[idx].float(), self.teacher(s)[c].cpu()[idx].float(),
                             source[c, idx])
        return out

    def ages(self, iteration: int) -> Optional[Tensor]:
        """Steps since each stored instance was seen (1-D, every filled slot), or None if empty."""
        seen = self.iteration[self.iteration >= 0]
        return None if seen.numel() == 0 else (iteration - seen).cpu()


def _all_gather_rows(rows: Tensor) -> Tensor:
    """Every rank's (m_r, W) rows, concatenated in rank order (two collectives: the counts,
    then the rows padded to the largest count). On the rows' device (NCCL needs CUDA)."""
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    most = max(counts)
    if most == 0:
        return rows[:0]
    padded = rows.new_zeros((most, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


@torch.no_grad()
def step_instances(batched_inputs: List[dict], gt_instances, student: Dict[int, Tensor],
                   teacher: Dict[int, Tensor], strides: List[int], min_size: float):
    """The GT boxes of a training step wider and higher than ``min_size`` original-image
    pixels, pooled at ``strides`` in both models' maps of the step.

    Args:
        batched_inputs (list[dict]): the step's raw batch (``width`` and ``image`` give the
            resize from the original image; ``image_id`` is kept as the source when an int).
        gt_instances (list[Instances]): its GT on the model's device (input-image pixels).
        student, teacher (dict[int, Tensor]): stride -> (N, C, H, W) maps of the step.

    Returns:
        (Tensor, dict, dict, Tensor): (m,) classes, stride -> (m, D_s) and (m, D_t) features
        (detached), and (m, 5) sources (image id or -1, box in original-image pixels).
    """
    # every image's boxes at once (a step's op count, not its flops, is its cost on the CPU)
    counts = [len(inst) for inst in gt_instances]
    boxes = torch.cat([inst.gt_boxes.tensor for inst in gt_instances])
    classes = torch.cat([inst.gt_classes for inst in gt_instances])
    device = boxes.device
    per_image = torch.tensor(counts, device=device)
    index = torch.repeat_interleave(torch.arange(len(counts), device=device), per_image)
    slot = torch.arange(len(boxes), device=device) - torch.repeat_interleave(per_image.cumsum(0) - per_image, per_image)
    scale = torch.tensor([x.get("width", x["image"].shape[-1]) / x["image"].shape[-1] for x in batched_inputs],
                         device=device, dtype=boxes.dtype)
    ids = [x.get("image_id", -1) for x in batched_inputs]
    ids = torch.tensor([float(i) if isinstance(i, int) and 0 <= i < 2 ** 24 else -1.0 for i in ids], device=device)
    original = boxes * scale[index, None]
    keep = ((original[:, 2:] - original[:, :2]) > min_size).all(dim=1).nonzero().squeeze(1)
    boxes, classes, index, slot, original = boxes[keep], classes[keep], index[keep], slot[keep], original[keep]
    sources = torch.cat([ids[index, None], original], dim=1)
    slots = max(counts, default=0)  # a bound on the boxes per image known on the host
    # float32 sums (the store keeps float16), by masks: a few boxes per image; one set of
    # averaging weights per stride serves both models' maps (the same input, the same shape)
    maps_s = {s: student[s].detach().float() for s in strides}
    maps_t = {s: teacher[s].detach().float() for s in strides}
    shapes = {s: (maps_s[s].shape[0], *maps_s[s].shape[2:]) for s in strides}
    weights = box_cell_weights_per_stride(boxes, index, shapes, torch.float32, device, slot, slots)
    f_s = {s: instance_features_by_masks(maps_s[s], boxes, index, s, weights[s], slot) for s in strides}
    f_t = {s: instance_features_by_masks(maps_t[s], boxes, index, s, weights[s], slot) for s in strides}
    return classes, f_s, f_t, sources


def record_step_instances(store: OnlineInstanceStore, ctx, batched_inputs: List[dict]) -> None:
    """Add a distillation step's GT instances to ``store``, pooled from the features the step
    computed (``ctx.student_features``, ``ctx.teacher_features``; the teacher's are already
    there for any head that reads them). In distributed training a collective."""
    classes, f_s, f_t, source = step_instances(batched_inputs, ctx.gt_instances, ctx.student_features,
                                               ctx.teacher_features, store.strides, store.min_size)
    store.add(classes, f_s, f_t, source, ctx.iteration)
