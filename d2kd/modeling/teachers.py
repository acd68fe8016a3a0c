"""Several teachers: the default one (``DISTILL.TEACHER``) and the named ones of
``DISTILL.TEACHERS``, each built, checked against the student and loaded as the single teacher
is, and each read only by the heads whose node's ``TEACHER`` names it.

A :class:`TeacherSlot` is a plain object, not an ``nn.Module``: the meta-architecture holds its
slots in a plain dict, so no teacher is in the student's ``parameters()``, ``state_dict()``, the
optimizer or DDP (the reason :class:`~d2kd.modeling.distill_mixin._Hidden` exists).
"""
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List

import torch
from detectron2.structures import ImageList
from torch import nn

from ..config import DEFAULT_TEACHER, teacher_key
from .kinds import DetectorKind
from .recorder import Recorder


@dataclass
class TeacherBuild:
    """One teacher as ``from_config`` builds it: not loaded yet (see ``DistillSetup``)."""

    module: nn.Module
    cfg: object
    kind: DetectorKind
    weights: str
    allow_pickle: bool = False
    cascade_stage: int = -1
    flip_channels: bool = False


@dataclass(eq=False)
class TeacherSlot:
    """One loaded, frozen teacher of a Distill meta-architecture and what its heads read.

    Attributes:
        name (str): ``DEFAULT_TEACHER`` or its name under ``DISTILL.TEACHERS``.
        module (nn.Module): the teacher, eval mode, no gradients.
        heads (list[str]): the enabled heads that read it (none: it never runs).
        requirements (frozenset[str]): the union of their ``requires``.
        common_strides (list[int]): strides both it and the student produce, ascending.
        recorder (Recorder): what its own passes record (RPN anchors, tower layers).
        weights_file (str): the local file its weights were read from.
    """

    name: str
    module: nn.Module
    cfg: object
    kind: DetectorKind
    cascade_stage: int = -1
    flip_channels: bool = False
    heads: List[str] = field(default_factory=list)
    requirements: FrozenSet[str] = frozenset()
    common_strides: List[int] = field(default_factory=list)
    recorder: Recorder = None
    weights_file: str = ""

    @property
    def key(self) -> str:
        """Its config node, e.g. "DISTILL.TEACHERS.RETINA"."""
        return teacher_key(self.name)

    @torch.no_grad()
    def images(self, batched_inputs: List[dict]) -> ImageList:
        """Its own preprocessing of the raw batch (its pixel mean/std and format)."""
        if self.flip_channels:
            batched_inputs = [{"image": x["image"].flip(0)} for x in batched_inputs]
        return self.module.preprocess_image(batched_inputs)


def heads_by_teacher(head_teachers: Dict[str, str], heads: Dict[str, nn.Module], name: str) -> Dict[str, nn.Module]:
    """The heads (name -> head) that read teacher ``name``."""
    return {h: heads[h] for h in heads if head_teachers.get(h, DEFAULT_TEACHER) == name}
