"""Plumbing shared by every Distill meta-architecture: the hidden frozen teacher, recording
the student's own forward, and the call of every distillation head.

A Distill meta-architecture is a few lines: the mixin, the detectron2 class it extends, and
two class attributes (its plain counterpart and its kind)::

    @META_ARCH_REGISTRY.register()
    class DistillRetinaNet(DistillMixin, RetinaNet):
        plain_meta_arch = "RetinaNet"
        kind = DENSE

In training the student runs its own, unmodified ``forward``; forward hooks (and, for what
no submodule returns, an overridden documented method such as ``label_anchors``) record what
heads may read. The heads then get a :class:`DistillContext` that runs the teacher lazily.
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..config import DEFAULT_TEACHER, teacher_key, teacher_nodes
from ..heads.registry import build_distill_heads, head_teacher
from ..prototypes.bank import PrototypeBank
from ..prototypes.online_store import record_step_instances
from ..structures import DistillContext, shapes_by_stride
from .head_tower import check_heads_tower_layers, tower_record_paths
from .kinds import DISTILL_META_ARCHS, DetectorKind
from .recorder import Recorder
from .requirements import check_requirements, teacher_parts
from .step_outputs import ModelStepOutputs
from ..value_checks import check_distill_values
from .teacher import TeacherConfigError, build_teacher, check_same_classes, load_teacher_weights
from .teachers import TeacherBuild, TeacherSlot, heads_by_teacher

logger = logging.getLogger(__name__)


class _Hidden:
    """Holds a module outside the owner's module tree.

    An attribute that is an ``nn.Module`` is registered as a submodule, and would then be in
    ``parameters()``, ``state_dict()``, the optimizer and DDP's gradient sync. The teacher must
    be in none of them, so the meta-architecture keeps it behind this plain object.
    """

    def __init__(self, module: nn.Module):
        self.module = module


@dataclass
class DistillSetup:
    """Everything ``from_config`` builds for distillation, passed to ``__init__`` as one arg.

    The teacher is built but not loaded: its weights are loaded once the pair has been
    checked (classes, head requirements), so a wrong pair fails before a large download.
    """

    teacher: nn.Module
    teacher_cfg: object
    teacher_kind: DetectorKind
    teacher_weights: str
    heads: nn.ModuleDict
    allow_pickle: bool = False
    prototype_cfg: object = None
    start_iter: int = 0
    max_iter: int = 1
    flip_teacher_channels: bool = False
    # DISTILL.TEACHER.CASCADE_STAGE: a Cascade R-CNN teacher's scores on given boxes
    cascade_stage: int = -1
    # DISTILL.TEACHERS: name -> the named teacher (built, not loaded); empty with one teacher
    extra_teachers: Dict[str, TeacherBuild] = field(default_factory=dict)
    # head name -> the teacher it reads (DEFAULT_TEACHER where its node names none)
    head_teachers: Dict[str, str] = field(default_factory=dict)


def _check_formats(cfg, teacher_cfg, name: str) -> None:
    formats = {cfg.INPUT.FORMAT, teacher_cfg.INPUT.FORMAT}
    if len(formats) > 1 and not formats <= {"RGB", "BGR"}:
        which = "teacher" if name == DEFAULT_TEACHER else f"teacher {teacher_key(name)}"
        raise ValueError(
            f"student INPUT.FORMAT {cfg.INPUT.FORMAT} and {which} INPUT.FORMAT "
            f"{teacher_cfg.INPUT.FORMAT} differ in a way d2kd cannot convert (only RGB <-> BGR)"
        )


def build_distill_setup(cfg, student_backbone) -> DistillSetup:
    check_distill_values(cfg)  # every bad value at once, before the teacher is built
    teacher, teacher_cfg, teacher_kind = build_teacher(cfg)
    _check_formats(cfg, teacher_cfg, DEFAULT_TEACHER)
    extra = {}
    for name, node in teacher_nodes(cfg).items():
        if name == DEFAULT_TEACHER:
            continue
        module, t_cfg, kind = build_teacher(cfg, name)
        _check_formats(cfg, t_cfg, name)
        extra[name] = TeacherBuild(module, t_cfg, kind, node.WEIGHTS, node.ALLOW_PICKLE, node.CASCADE_STAGE,
                                   cfg.INPUT.FORMAT != t_cfg.INPUT.FORMAT)
    teachers_shapes = {DEFAULT_TEACHER: shapes_by_stride(teacher.backbone)}
    teachers_shapes.update({name: shapes_by_stride(b.module.backbone) for name, b in extra.items()})
    heads = build_distill_heads(cfg, shapes_by_stride(student_backbone), shapes_by_stride(teacher.backbone),
                                teachers_shapes)
    if len(heads) == 0:
        logger.warning("DISTILL.HEADS is empty: nothing is distilled")
    return DistillSetup(
        teacher=teacher,
        teacher_cfg=teacher_cfg,
        teacher_kind=teacher_kind,
        teacher_weights=cfg.DISTILL.TEACHER.WEIGHTS,
        heads=heads,
        allow_pickle=cfg.DISTILL.TEACHER.ALLOW_PICKLE,
        prototype_cfg=cfg,
        start_iter=cfg.DISTILL.SCHEDULE.START_ITER,
        max_iter=cfg.SOLVER.MAX_ITER,
        flip_teacher_channels=cfg.INPUT.FORMAT != teacher_cfg.INPUT.FORMAT,
        cascade_stage=cfg.DISTILL.TEACHER.CASCADE_STAGE,
        extra_teachers=extra,
        head_teachers={name: head_teacher(cfg, name) for name in heads},
    )


class DistillMixin:
    """Mixed into a detectron2 meta-architecture (before it in the MRO).

    Subclasses set ``plain_meta_arch`` (the stock ``META_ARCH_REGISTRY`` name their student
    is) and ``kind`` (a :class:`DetectorKind`). The mixin adds one constructor argument,
    ``distill`` (a :class:`DistillSetup` built from ``cfg.DISTILL``), to the detector's own.
    At inference the model is the student alone.
    """

    plain_meta_arch: str = ""
    kind: Optional[DetectorKind] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.plain_meta_arch:
            DISTILL_META_ARCHS[cls.__name__] = cls

    @configurable
    def __init__(self, *, distill: DistillSetup, **kwargs):
        super().__init__(**kwargs)
        self._init_distill(distill)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["distill"] = build_distill_setup(cfg, ret["backbone"])
        return ret

    def _init_distill(self, setup: DistillSetup):
        if not self.kind.matches(self):
            raise ValueError(
                f"{type(self).__name__} distils {self.kind.describe}; this student's "
                "proposal generator or ROI heads are not of that form"
            )
        teacher = setup.teacher
        self._teacher = _Hidden(teacher)
        self.teacher_cfg = setup.teacher_cfg
        self.teacher_kind = setup.teacher_kind
        self.teacher_cascade_stage = setup.cascade_stage
        self.distill_heads = setup.heads
        self._distill_start_iter = setup.start_iter
        self._distill_max_iter = setup.max_iter
        self._flip_teacher_channels = setup.flip_teacher_channels
        builds = {DEFAULT_TEACHER: TeacherBuild(teacher, setup.teacher_cfg, setup.teacher_kind, setup.teacher_weights,
                                                setup.allow_pickle, setup.cascade_stage, setup.flip_teacher_channels)}
        builds.update(setup.extra_teachers)
        self.head_teachers = {h: setup.head_teachers.get(h, DEFAULT_TEACHER) for h in self.distill_heads}
        for h, name in self.head_teachers.items():
            if name not in builds:  # the build checks this too; a setup made by hand may not have
                from ..heads.registry import unknown_teacher_message

                raise TeacherConfigError(unknown_teacher_message(h, name, builds))
        # a plain dict of plain objects: no teacher is a submodule (see _Hidden)
        self._teachers: Dict[str, TeacherSlot] = {}
        for name, b in builds.items():
            heads = heads_by_teacher(self.head_teachers, self.distill_heads, name)
            slot = TeacherSlot(name=name, module=b.module, cfg=b.cfg, kind=b.kind, cascade_stage=b.cascade_stage,
                               flip_channels=b.flip_channels, heads=list(heads),
                               requirements=frozenset().union(*[h.requires for h in heads.values()]))
            slot.common_strides = sorted(set(shapes_by_stride(self.backbone)) & set(shapes_by_stride(b.module.backbone)))
            self._teachers[name] = slot
            check_same_classes(self, self.kind, b.module, b.kind, key=slot.key)
            check_requirements(heads, self, self.kind, b.module, b.kind)
            if name != DEFAULT_TEACHER and not heads:
                logger.warning(f"{slot.key} is read by no enabled head (their TEACHER keys): it is "
                               "loaded and checked, but never runs")
        default = self._teachers[DEFAULT_TEACHER]
        self.common_strides = default.common_strides
        self.requirements = frozenset().union(*[h.requires for h in self.distill_heads.values()])
        # dense-head tower layers the heads read (CrossKD): recorded during the forward passes
        tower_layers = {}
        for name, slot in self._teachers.items():
            tower_layers[name] = check_heads_tower_layers(
                heads_by_teacher(self.head_teachers, self.distill_heads, name), self, self.kind, slot.module, slot.kind)
        self.tower_layers = frozenset().union(*tower_layers.values())
        # GK's prototypes, per teacher-student pair: the default teacher's bank keeps its old
        # name (prototype_bank.* in checkpoints), a named teacher's is extra_prototype_banks.<NAME>
        self.prototype_bank = None
        self.extra_prototype_banks = nn.ModuleDict()
        for name, slot in self._teachers.items():
            if "prototypes" in slot.requirements:
                bank = PrototypeBank.from_config(
                    setup.prototype_cfg, shapes_by_stride(self.backbone),
                    shapes_by_stride(slot.module.backbone), self.kind.num_classes(self),
                )
                if name == DEFAULT_TEACHER:
                    self.prototype_bank = bank
                else:
                    self.extra_prototype_banks[name] = bank
        for name, b in builds.items():
            # the local file the teacher was read from: its content identifies the teacher on resume
            self._teachers[name].weights_file = load_teacher_weights(
                b.module, b.weights, allow_pickle=b.allow_pickle, key=self._teachers[name].key)
        self.teacher_weights_file = default.weights_file
        student_towers = {}
        if "student.head_tower" in self.requirements:
            student_towers = tower_record_paths(self, self.kind, self.tower_layers)
        self._recorder = Recorder(self, self.kind.recorded, appending=student_towers)
        for name, slot in self._teachers.items():
            teacher_towers = {}
            if "teacher.head_tower" in slot.requirements:
                teacher_towers = tower_record_paths(slot.module, slot.kind, tower_layers[name])
            slot.recorder = Recorder(slot.module, slot.kind.recorded, appending=teacher_towers)
            slot.module.to(self.device)
        self.teacher_recorder = default.recorder

    @property
    def teacher(self) -> nn.Module:
        """The default teacher (``DISTILL.TEACHER``); :meth:`teacher_slots` has them all."""
        return self._teacher.module

    def teacher_slots(self) -> Dict[str, TeacherSlot]:
        """Every teacher by name (``DEFAULT_TEACHER`` first), read or not."""
        return self._teachers

    def prototype_banks(self) -> Dict[str, PrototypeBank]:
        """Teacher name -> the prototype bank of its pair with the student (only the teachers
        that a prototype-reading head reads)."""
        banks = {DEFAULT_TEACHER: self.prototype_bank} if self.prototype_bank is not None else {}
        banks.update(self.extra_prototype_banks.items())
        return banks

    def teacher_parts(self) -> List[str]:
        """The parts of the teacher the enabled heads run each step (for logs and benchmarks)."""
        return teacher_parts(self.requirements)

    # ---- keeping the hidden teacher frozen, in eval mode and on the student's device ----
    def train(self, mode: bool = True):
        super().train(mode)
        # SimpleTrainer calls model.train(); BatchNorm statistics of the teacher must not move.
        for slot in self.__dict__.get("_teachers", {}).values():
            slot.module.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() reach submodules through _apply; the teacher is not one.
        super()._apply(fn, *args, **kwargs)
        for slot in self.__dict__.get("_teachers", {}).values():
            slot.module._apply(fn, *args, **kwargs)
        return self

    # ---- recording the student's own forward ----
    def preprocess_image(self, batched_inputs: List[Dict[str, Tensor]]) -> ImageList:
        images = super().preprocess_image(batched_inputs)
        self._recorder.put("images", images)
        return images

    @torch.no_grad()
    def teacher_images(self, batched_inputs: List[dict], name: str = DEFAULT_TEACHER) -> ImageList:
        """The teacher's own preprocessing of the raw batch (its pixel mean/std and format)."""
        return self._teachers[name].images(batched_inputs)

    @torch.no_grad()
    def teacher_backbone(self, batched_inputs: List[dict], name: str = DEFAULT_TEACHER) -> Dict[str, Tensor]:
        """The teacher's FPN outputs, name-keyed (used by the prototype refresh)."""
        return self._teachers[name].module.backbone(self.teacher_images(batched_inputs, name).tensor)

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        if not self.training:
            return super().forward(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError(f"{type(self).__name__} needs 'instances' (GT annotations) in training")
        iteration = get_event_storage().iter
        if not self.distillation_active(iteration):
            losses = super().forward(batched_inputs)
            losses.update(self.idle_distill_losses())
            return losses
        with self._recorder.recording() as record:
            losses = super().forward(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        banks = self.prototype_banks()
        # one context per teacher that a head reads, all on the student's one recorded forward;
        # a teacher no head reads gets none and never runs
        contexts = {}
        for name, slot in self._teachers.items():
            if slot.heads:
                contexts[name] = DistillContext(
                    ModelStepOutputs(self, batched_inputs, record, gt_instances, teacher=slot),
                    gt_instances=gt_instances,
                    num_classes=self.kind.num_classes(self),
                    student_strides=list(shapes_by_stride(self.backbone)),
                    iteration=iteration,
                    max_iter=self._distill_max_iter,
                    prototype_bank=banks.get(name),
                )
        # Distillation losses in float32: autocast off for the heads (the teacher passes they
        # trigger re-enter the student's autocast state, see ModelStepOutputs).
        with torch.autocast(self.device.type, enabled=False):
            losses.update(self.distill_losses(contexts))
            for name, bank in banks.items():
                if bank.store is not None:
                    record_step_instances(bank.store, contexts[name], batched_inputs)
        return losses

    # ---- the distillation step ----
    def distillation_active(self, iteration: int) -> bool:
        return iteration >= self._distill_start_iter and len(self.distill_heads) > 0

    def idle_distill_losses(self) -> Dict[str, Tensor]:
        """Before START_ITER: a zero term over every trainable distillation parameter.

        DDP (without find_unused_parameters) requires every trainable parameter to get a
        gradient each step; a zero-weighted term keeps the adapters in the graph.
        """
        params = [p for p in self.distill_heads.parameters() if p.requires_grad]
        if not params:
            return {}
        return {"loss_distill_idle": sum(p.sum() for p in params) * 0.0}

    def distill_losses(self, ctx) -> Dict[str, Tensor]:
        """Every head's losses; ``ctx`` is one :class:`DistillContext` (every head reads it) or
        teacher name -> context (each head reads its teacher's)."""
        losses = {}
        for name, head in self.distill_heads.items():
            head_ctx = ctx if isinstance(ctx, DistillContext) else ctx[self.head_teachers[name]]
            for key, value in head(head_ctx).items():
                if not torch.isfinite(value).all():
                    raise FloatingPointError(
                        f"distillation loss {key} (head '{name}') is {value.detach().cpu()} at "
                        f"iteration {head_ctx.iteration}; the other losses were finite"
                    )
                losses[key] = value
        return losses


__all__ = ["DistillMixin", "DistillSetup", "TeacherConfigError"]
