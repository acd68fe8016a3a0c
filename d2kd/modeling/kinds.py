"""Detector kinds: what a detector offers to distillation heads, as class attributes.

Every Distill meta-architecture declares its plain counterpart (``plain_meta_arch``, the name
in detectron2's ``META_ARCH_REGISTRY``) and its :class:`DetectorKind`. Export, teacher loading
and the build-time check of head requirements read those, never the architecture's name.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Optional, Tuple

from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.proposal_generator.rpn import RPN
from torch import nn


@dataclass(frozen=True)
class TowerSpec:
    """Where a dense head keeps its towers, for the ``head_tower`` and ``cross_head``
    capabilities (:mod:`d2kd.modeling.head_tower`).

    Attributes:
        branches (tuple): per head output, in the head's output order, ``(subnet, predictor,
            scale)``: attribute names on the model's ``head`` of the tower (an
            ``nn.Sequential`` of convs, norms and activations), of the conv that follows it,
            and of a per-level learnable scalar multiplying the predictor's output ("" for
            none; GFL's ``scales``).
    """

    branches: Tuple[Tuple[str, str, str], ...]


# detectron2's RetinaNetHead and d2kd's GFLHead: a class and a box tower
RETINANET_TOWERS = TowerSpec((("cls_subnet", "cls_score", ""), ("bbox_subnet", "bbox_pred", "")))


@dataclass(frozen=True)
class DetectorKind:
    """What a family of detectors offers to the distillation context.

    Attributes:
        name (str): "two_stage" or "dense".
        capabilities (frozenset[str]): the capabilities of
            :data:`d2kd.structures.context.REQUIREMENTS` this kind can supply.
        recorded (dict[str, str]): record key -> path of the student submodule whose output
            is recorded by a forward hook during the student's own forward.
        num_classes (callable): model -> C, its number of foreground classes.
        anchor_generator (callable): model -> the anchor generator its anchors come from.
        describe (str): for error messages.
        num_classes_key (str): the config key that sets ``num_classes`` (for error messages).
        model_class (type or None): when set, the kind matches exactly the instances of this
            class (e.g. d2kd's GFL); else the kind's structural test below.
        towers (TowerSpec or None): the dense head's towers, for kinds that offer
            ``head_tower`` / ``cross_head``.
    """

    name: str
    capabilities: FrozenSet[str]
    recorded: Dict[str, str] = field(hash=False)
    num_classes: Callable[[nn.Module], int] = field(hash=False)
    anchor_generator: Callable[[nn.Module], nn.Module] = field(hash=False)
    describe: str = ""
    num_classes_key: str = ""
    model_class: Optional[type] = field(default=None, hash=False)
    towers: Optional[TowerSpec] = field(default=None, hash=False)

    def matches(self, model: nn.Module) -> bool:
        if self.model_class is not None:
            return isinstance(model, self.model_class)
        if self.name == "two_stage":
            return (
                isinstance(model, GeneralizedRCNN)
                and isinstance(model.proposal_generator, RPN)
                and hasattr(model.roi_heads, "box_predictor")
            )
        return isinstance(model, DenseDetector)


TWO_STAGE = DetectorKind(
    name="two_stage",
    capabilities=frozenset({"images", "features", "rpn", "rois", "box_head", "anchors"}),
    recorded={
        "backbone": "backbone",
        "rpn.anchors": "proposal_generator.anchor_generator",
        "rpn.head": "proposal_generator.rpn_head",
        "rpn.out": "proposal_generator",
        "roi.out": "roi_heads",
        "roi.predictions": "roi_heads.box_predictor",
    },
    num_classes=lambda model: model.roi_heads.num_classes,
    anchor_generator=lambda model: model.proposal_generator.anchor_generator,
    describe="a two-stage detector (GeneralizedRCNN with an RPN and a box head)",
    num_classes_key="MODEL.ROI_HEADS.NUM_CLASSES",
)

DENSE = DetectorKind(
    name="dense",
    capabilities=frozenset({"images", "features", "dense", "anchors", "head_tower", "cross_head"}),
    recorded={"backbone": "backbone", "dense.head": "head", "dense.anchors": "anchor_generator"},
    num_classes=lambda model: model.num_classes,
    anchor_generator=lambda model: model.anchor_generator,
    describe="a dense one-stage detector (a detectron2 DenseDetector such as RetinaNet)",
    num_classes_key="MODEL.RETINANET.NUM_CLASSES",
    towers=RETINANET_TOWERS,
)

# Tried in order by kind_of(), the more specific first. A module that defines a kind for its own
# detector class inserts it before the structural kind it would otherwise fall under
# (d2kd.modeling.gfl puts GFL_KIND before DENSE).
KINDS = [TWO_STAGE, DENSE]

# Distill meta-architecture name -> class; filled by DistillMixin.__init_subclass__.
DISTILL_META_ARCHS: Dict[str, type] = {}


def kind_of(model: nn.Module) -> Optional[DetectorKind]:
    """The kind of a built detector: its class' declared kind, else the first that matches."""
    declared = getattr(type(model), "kind", None)
    if isinstance(declared, DetectorKind):
        return declared
    for kind in KINDS:
        if kind.matches(model):
            return kind
    return None


def is_distill_meta_arch(name: str) -> bool:
    return name in DISTILL_META_ARCHS


def plain_meta_arch_of(name: str) -> str:
    """The stock meta-architecture a Distill meta-architecture's student is."""
    if name not in DISTILL_META_ARCHS:
        raise ValueError(
            f"MODEL.META_ARCHITECTURE is {name}, not a distillation meta-architecture "
            f"({', '.join(sorted(DISTILL_META_ARCHS))})"
        )
    return DISTILL_META_ARCHS[name].plain_meta_arch
