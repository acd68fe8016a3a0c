"""The prototype bank: per stride and class, K student and K teacher prototypes, as model state."""
import logging
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..structures import select_strides
from .online_store import OnlineInstanceStore

# DISTILL.PROTOTYPES.SOURCE: the paper's fixed image subset, or the training steps' instances
SOURCES = ("images", "online")

logger = logging.getLogger(__name__)


class PrototypeBank(nn.Module):
    """Student and teacher prototypes of every class at every distilled stride.

    Held as fixed-shape buffers (``student_s8`` (C, K, D_s), ``teacher_s8`` (C, K, D_t),
    ``valid_s8`` (C, K) bool) so they are saved in checkpoints, restored on resume and
    identical in shape on every rank. A class with fewer than K prototypes has the rest
    marked invalid; a class with none has no valid slot and counts as "no prototypes"
    (robust weight 1, no global term). ``num_builds`` counts the builds so far.

    A checkpoint's bank that does not fit this one (other ``DISTILL.PROTOTYPES.NUM`` or
    ``STRIDES``, classes or channels) is never half-loaded: the whole bank is left unbuilt,
    with a warning saying why, so the refresh hook rebuilds it at the next step (from
    ``DISTILL.PROTOTYPES.START_ITER`` on). ``rebuild_reason`` keeps the why for its log line.
    """

    def __init__(self, strides: List[int], student_channels: Dict[int, int],
                 teacher_channels: Dict[int, int], num_classes: int, num_prototypes: int,
                 store: Optional[OnlineInstanceStore] = None):
        super().__init__()
        # DISTILL.PROTOTYPES.SOURCE "online": the training steps' instances the builds select from
        self.store = store
        self.strides = sorted(strides)
        self.num_classes = num_classes
        self.num_prototypes = num_prototypes
        for s in self.strides:
            self.register_buffer(f"student_s{s}", torch.zeros(num_classes, num_prototypes, student_channels[s]))
            self.register_buffer(f"teacher_s{s}", torch.zeros(num_classes, num_prototypes, teacher_channels[s]))
            self.register_buffer(f"valid_s{s}", torch.zeros(num_classes, num_prototypes, dtype=torch.bool))
            # where each prototype came from: (dataset index, x1, y1, x2, y2), -1 if unknown
            self.register_buffer(f"source_s{s}", torch.full((num_classes, num_prototypes, 5), -1.0))
        self.register_buffer("num_builds", torch.zeros((), dtype=torch.long))
        self.rebuild_reason = ""

    @classmethod
    def from_config(cls, cfg, student_shapes: Dict[int, ShapeSpec], teacher_shapes: Dict[int, ShapeSpec],
                    num_classes: int):
        node = cfg.DISTILL.PROTOTYPES
        strides = select_strides(node.STRIDES, student_shapes, teacher_shapes, "DISTILL.PROTOTYPES.STRIDES")
        student_channels = {s: student_shapes[s].channels for s in strides}
        teacher_channels = {s: teacher_shapes[s].channels for s in strides}
        source = node.get("SOURCE", "images")
        if source not in SOURCES:
            raise ValueError(f"DISTILL.PROTOTYPES.SOURCE must be one of {SOURCES}, got '{source}'")
        store = None
        if source == "online":
            store = OnlineInstanceStore(strides, student_channels, teacher_channels, num_classes,
                                        node.ONLINE_CAPACITY, node.MIN_SIZE)
        return cls(strides, student_channels, teacher_channels, num_classes, node.NUM, store=store)

    # ---- checkpoints ----
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = {name: buf for name, buf in self._buffers.items() if name not in self._non_persistent_buffers_set}
        saved_builds = state_dict.get(prefix + "num_builds")
        problems = []
        for name, buf in own.items():
            value = state_dict.get(prefix + name)
            if value is None:
                problems.append(f"{name} absent")
            elif tuple(value.shape) != tuple(buf.shape):
                problems.append(f"{name} {tuple(value.shape)} instead of {tuple(buf.shape)}")
        if saved_builds is None or not problems:
            # no bank in the file (e.g. a plain detector's weights), or one that fits
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                 missing_keys, unexpected_keys, error_msgs)
        # A bank that does not fit: load none of it, so that it counts as unbuilt. (fvcore drops
        # mis-shaped entries before this is called; those show up as absent.)
        for name in own:
            if prefix + name not in missing_keys:
                missing_keys.append(prefix + name)
        self.clear()
        if int(saved_builds) > 0:
            self.rebuild_reason = (
                f"the checkpoint's prototype bank does not fit this model ({len(problems)} of its "
                f"{len(own)} buffers absent or of another shape, e.g. {'; '.join(problems[:2])}; "
                "mis-shaped ones are skipped by the checkpointer, which warns about each): "
                "DISTILL.PROTOTYPES.NUM or STRIDES, the classes or the channels differ from the run "
                "that saved it"
            )
            logger.warning(
                f"{self.rebuild_reason}. The bank is left unbuilt and will be rebuilt at the next "
                "training step (from DISTILL.PROTOTYPES.START_ITER on), not restored"
            )

    @torch.no_grad()
    def clear(self, reason: str = "") -> None:
        """Make the bank unbuilt (no valid prototype, ``num_builds`` 0): the refresh hook then
        rebuilds it at the next step; ``reason`` goes into its log line. With a reason (e.g.
        another teacher) the online store, if any, is emptied too; without one (a checkpoint's
        bank that does not fit) the store keeps what it holds or loads."""
        for name, buf in self._buffers.items():
            if name not in self._non_persistent_buffers_set:
                buf.fill_(-1.0 if name.startswith("source_") else 0)
        if self.store is not None and reason:  # a reason (another teacher) voids its features too
            self.store.clear()
        if reason:
            self.rebuild_reason = reason

    # ---- access ----
    def student(self, stride: int) -> Tensor:
        return getattr(self, f"student_s{stride}")

    def teacher(self, stride: int) -> Tensor:
        return getattr(self, f"teacher_s{stride}")

    def valid(self, stride: int) -> Tensor:
        return getattr(self, f"valid_s{stride}")

    def source(self, stride: int) -> Tensor:
        return getattr(self, f"source_s{stride}")

    @property
    def is_built(self) -> bool:
        return bool(self.num_builds > 0)

    def prototypes_per_class(self, stride: int) -> Tensor:
        """(C,) number of valid prototypes of each class at ``stride``."""
        return self.valid(stride).sum(dim=1)

    # ---- building ----
    @torch.no_grad()
    def set_class(self, stride: int, cls: int, student: Tensor, teacher: Tensor, source: Tensor = None) -> None:
        """Replace the prototypes of class ``cls`` at ``stride`` with the given (k, D) rows
        (and, optionally, their (k, 5) sources)."""
        k = student.shape[0]
        if k > self.num_prototypes or teacher.shape[0] != k:
            raise ValueError(f"expected at most {self.num_prototypes} prototype pairs, got {k} / {teacher.shape[0]}")
        self.student(stride)[cls].zero_()
        self.teacher(stride)[cls].zero_()
        self.valid(stride)[cls].zero_()
        self.source(stride)[cls].fill_(-1.0)
        if source is not None and k:
            self.source(stride)[cls, :k] = source.to(self.source(stride))
        if k:
            self.student(stride)[cls, :k] = student.to(self.student(stride))
            self.teacher(stride)[cls, :k] = teacher.to(self.teacher(stride))
            self.valid(stride)[cls, :k] = True

    # ---- the quantities RDM needs ----
    def max_cosines(self, stride: int, classes: Tensor, student_feats: Tensor, teacher_feats: Tensor):
        """Largest cosine of each instance to its own class' prototypes, in each space.

        Args:
            classes (Tensor): (M,) class of each instance.
            student_feats, teacher_feats (Tensor): (M, D_s), (M, D_t).
        Returns:
            (Tensor, Tensor, Tensor): student (M,), teacher (M,) max cosines, and (M,) bool
            telling which instances' class has any prototype (the cosines are 0 elsewhere).
        """
        valid = self.valid(stride)[classes]  # (M, K)
        cos_s = _cosine_to(student_feats, self.student(stride)[classes])
        cos_t = _cosine_to(teacher_feats, self.teacher(stride)[classes])
        lowest = torch.finfo(cos_s.dtype).min
        has = valid.any(dim=1)
        max_s = cos_s.masked_fill(~valid, lowest).max(dim=1).values
        max_t = cos_t.masked_fill(~valid, lowest).max(dim=1).values
        return max_s.where(has, torch.zeros_like(max_s)), max_t.where(has, torch.zeros_like(max_t)), has

    def robust_weights(self, stride: int, classes: Tensor, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        """GK's robust weights (docs/METHODS.md 1.4), detached and clamped to [0, 1].

        ``w = 1 - |max_k cos(f_s, P_s[c]) - max_k cos(f_t, P_t[c])|``; 1 for classes without
        prototypes (and for everything before the first build).
        """
        with torch.no_grad():
            max_s, max_t, has = self.max_cosines(stride, classes, student_feats.float(), teacher_feats.float())
            w = (1.0 - (max_s - max_t).abs()).clamp(0.0, 1.0)
            return w.where(has, torch.ones_like(w))

    def relation_rows(self, stride: int, student_feats: Tensor, teacher_feats: Tensor):
        """Cosines of each instance to every valid prototype (all classes), in each space.

        Returns:
            (Tensor, Tensor): (M, P) student and teacher rows, P = number of valid prototypes
            at ``stride`` (0 before the first build). Gradients flow to ``student_feats``.
        """
        valid = self.valid(stride).flatten()
        p_s = self.student(stride).flatten(0, 1)[valid]
        p_t = self.teacher(stride).flatten(0, 1)[valid]
        return (
            F.normalize(student_feats.float(), dim=1) @ F.normalize(p_s.float(), dim=1).t(),
            F.normalize(teacher_feats.float(), dim=1) @ F.normalize(p_t.float(), dim=1).t(),
        )


def _cosine_to(x: Tensor, protos: Tensor) -> Tensor:
    """(M, D) instances against (M, K, D) per-instance prototypes -> (M, K) cosines."""
    return torch.einsum("md,mkd->mk", F.normalize(x, dim=1), F.normalize(protos, dim=2))
