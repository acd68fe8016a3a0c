"""Teachers described by a detectron2 LazyConfig (a ``.py`` file) instead of a yacs yaml.

``DISTILL.TEACHER.CONFIG_FILE`` may name a ``.py`` LazyConfig (a path, or a detectron2
model-zoo name such as ``new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py``). Its ``model`` is
built with ``instantiate``; ``DISTILL.TEACHER.OPTS`` are LazyConfig overrides
(``"model.roi_heads.num_classes=6"``). Everything after the build -- the kind check, strict
loading of ``DISTILL.TEACHER.WEIGHTS``, freezing, hiding, eval mode -- is the yacs teacher's
path (:mod:`d2kd.modeling.teacher`).
"""
import inspect
from typing import List, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig, instantiate
from omegaconf import DictConfig, OmegaConf

from ..config import TeacherConfigError

__all__ = ["LazyTeacherConfig", "is_lazy_config_file", "build_lazy_teacher_cfg", "build_lazy_teacher_model"]

# Where a LazyConfig says which channel order its model reads, in the order they are trusted:
# the training mapper decoded the images the model was trained on; ``model.input_format``
# (GeneralizedRCNN's, RetinaNet's) is otherwise only used for visualisation.
FORMAT_KEYS = ("dataloader.train.mapper.image_format", "model.input_format")
# The LazyConfig keys of a teacher's class count, by kind name (for error messages).
NUM_CLASSES_KEYS = {"two_stage": "model.roi_heads.num_classes", "dense": "model.num_classes"}
_ABSENT = object()


def is_lazy_config_file(path: str) -> bool:
    return str(path).endswith(".py")


class LazyTeacherConfig:
    """A LazyConfig teacher's config, after ``DISTILL.TEACHER.OPTS``.

    It offers the few keys d2kd reads from a yacs teacher's config, as frozen yacs nodes:
    ``MODEL.META_ARCHITECTURE`` (the model's class name, for messages), ``MODEL.DEVICE`` (the
    student's) and ``INPUT.FORMAT`` (its channel order, for the RGB <-> BGR check). The whole
    LazyConfig is ``lazy``; ``config_file`` is the local file it was read from.
    """

    def __init__(self, lazy: DictConfig, config_file: str, input_format: str, device: str):
        self.lazy = lazy
        self.config_file = config_file
        self.MODEL = CN({"META_ARCHITECTURE": _target_name(lazy.model), "DEVICE": device})
        self.INPUT = CN({"FORMAT": input_format})
        self.MODEL.freeze()
        self.INPUT.freeze()

    def dump(self) -> str:
        """The LazyConfig as yaml, for logs (callables and objects appear as yaml python tags)."""
        return OmegaConf.to_yaml(self.lazy)

    def __repr__(self):
        return f"LazyTeacherConfig({self.config_file}, model={self.MODEL.META_ARCHITECTURE})"


def build_lazy_teacher_cfg(config_file: str, opts: Sequence[str], device: str, shown_name: str = "") -> LazyTeacherConfig:
    """Load the LazyConfig ``config_file`` (a local path) and apply ``opts`` ("key=value").

    ``shown_name`` is the ``DISTILL.TEACHER.CONFIG_FILE`` value the user wrote (for messages).
    """
    shown_name = shown_name or config_file
    try:
        lazy = LazyConfig.load(config_file)
    except Exception as e:  # a syntax or import error in the user's file: say which file
        raise TeacherConfigError(
            f"DISTILL.TEACHER.CONFIG_FILE = '{shown_name}' could not be loaded as a LazyConfig: "
            f"{type(e).__name__}: {e}"
        ) from e
    if "model" not in lazy or not isinstance(lazy.model, DictConfig) or "_target_" not in lazy.model:
        raise TeacherConfigError(
            f"the LazyConfig teacher '{shown_name}' defines no `model = L(SomeDetector)(...)`: "
            "d2kd builds the teacher with instantiate(cfg.model)"
        )
    apply_teacher_overrides(lazy, list(opts), shown_name)
    return LazyTeacherConfig(lazy, config_file, teacher_input_format(lazy, shown_name), device)


def apply_teacher_overrides(lazy: DictConfig, opts: List[str], shown_name: str) -> None:
    """``DISTILL.TEACHER.OPTS`` as LazyConfig overrides, in place; a yacs-style list or a key
    the config neither has nor could take is an error naming it."""
    if not opts:
        return
    bare = [o for o in opts if "=" not in str(o)]
    if bare:
        raise TeacherConfigError(
            f"DISTILL.TEACHER.OPTS = {list(opts)}: the teacher '{shown_name}' is a LazyConfig (.py), "
            "whose overrides are 'key=value' strings on its own keys, e.g. "
            "['model.roi_heads.num_classes=6']; yacs-style KEY VALUE pairs (such as "
            "MODEL.ROI_HEADS.NUM_CLASSES 6) apply only to a yaml teacher. "
            f"Not of the form key=value: {bare}"
        )
    for o in opts:
        _check_override_key(lazy, str(o).split("=", 1)[0].strip(), shown_name)
    try:
        LazyConfig.apply_overrides(lazy, list(opts))
    except Exception as e:  # hydra's grammar errors, or a key below a plain value
        raise TeacherConfigError(f"DISTILL.TEACHER.OPTS = {list(opts)} cannot be applied to '{shown_name}': {e}") from e


def _check_override_key(lazy: DictConfig, key: str, shown_name: str) -> None:
    """An override must name a key the config has, or an argument of the LazyCall it sits
    in (``OmegaConf.update`` would otherwise add a typo silently; instantiating would then
    fail far from its cause, or a plain dict would keep it unread)."""
    parts = key.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if OmegaConf.select(lazy, prefix, default=_ABSENT, throw_on_missing=False) is _ABSENT:
            break
    else:
        return  # the key exists
    parent_key, name = ".".join(parts[: depth - 1]), parts[depth - 1]
    parent = OmegaConf.select(lazy, parent_key, default=None) if parent_key else lazy
    target = _target_of(parent) if isinstance(parent, DictConfig) else None
    if depth == len(parts) and target is not None:
        if _accepts(target, name):
            return
        where = f"{parent_key} builds {_target_name(parent)}, which takes no argument '{name}'"
    else:
        where = f"{parent_key or 'the config'} has no key '{name}'"
    raise TeacherConfigError(
        f"DISTILL.TEACHER.OPTS: '{key}' is not a key of the teacher's LazyConfig '{shown_name}' "
        f"({where}). Overrides replace keys the config has, e.g. 'model.roi_heads.num_classes=6'"
    )


def _target_of(node: DictConfig):
    if "_target_" not in node:
        return None
    target = node._target_
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            return locate(target)
        except Exception:
            return None
    return target


def _target_name(node: DictConfig) -> str:
    target = _target_of(node)
    return getattr(target, "__name__", str(node.get("_target_", "?")))


def _accepts(target, name: str) -> bool:
    """Whether calling ``target`` can take the keyword ``name``; a class's ``**kwargs`` are
    followed up its bases' ``__init__`` (detectron2's ROI heads pass theirs on), up to
    ``nn.Module`` / ``object``, which take none."""
    from torch import nn

    if isinstance(target, type):
        inits = [c.__dict__["__init__"] for c in target.__mro__
                 if "__init__" in c.__dict__ and c not in (object, nn.Module)]
    else:
        inits = [target]
    for fn in inits:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no signature to read: cannot tell, let it through
            return True
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return not isinstance(target, type)


def teacher_input_format(lazy: DictConfig, shown_name: str) -> str:
    """The channel order the teacher reads ("BGR", "RGB", ...), from its LazyConfig.

    The training mapper's ``image_format`` is what the model learnt on; ``model.input_format``
    is used when the config has no data loader. Both present and different is an error (one
    of them is wrong, and the pixel mean/std belong to one order only); neither is an error too.
    """
    found = {}
    for key in FORMAT_KEYS:
        value = OmegaConf.select(lazy, key, default=None)
        if value is not None:
            found[key] = str(value)
    if not found:
        raise TeacherConfigError(
            f"the LazyConfig teacher '{shown_name}' gives neither {' nor '.join(FORMAT_KEYS)}: d2kd "
            "cannot tell whether it reads RGB or BGR images. Add e.g. 'model.input_format=BGR' "
            "(the order its pixel_mean / pixel_std are in) to DISTILL.TEACHER.OPTS"
        )
    if len(set(found.values())) > 1:
        raise TeacherConfigError(
            f"the LazyConfig teacher '{shown_name}' has {FORMAT_KEYS[0]} = {found[FORMAT_KEYS[0]]} but "
            f"{FORMAT_KEYS[1]} = {found[FORMAT_KEYS[1]]}: d2kd cannot tell which order the teacher "
            "was trained on. Set the wrong one right in DISTILL.TEACHER.OPTS, e.g. "
            f"'{FORMAT_KEYS[1]}={found[FORMAT_KEYS[0]]}'"
        )
    return next(iter(found.values()))


def build_lazy_teacher_model(teacher_cfg: LazyTeacherConfig, shown_name: str = ""):
    """``instantiate(cfg.model)`` on the student's device (not yet loaded, not yet frozen)."""
    shown_name = shown_name or teacher_cfg.config_file
    try:
        model = instantiate(teacher_cfg.lazy.model)
    except Exception as e:
        hint = (f". Install {e.name} (detectron2's ViT needs timm: pip install -r requirements.txt)"
                if isinstance(e, ModuleNotFoundError) else "")
        raise TeacherConfigError(
            f"the model of the LazyConfig teacher '{shown_name}' could not be built: "
            f"{type(e).__name__}: {e}{hint}"
        ) from e
    check_padding(model, shown_name)
    return model.to(torch.device(teacher_cfg.MODEL.DEVICE))


def check_padding(model, shown_name: str) -> None:
    """A teacher whose backbone pads every image to a fixed square (ViTDet's ``square_pad``)
    would see other spatial sizes than the student: its features would not pair cell by cell."""
    constraints = getattr(getattr(model, "backbone", None), "padding_constraints", None) or {}
    square = constraints.get("square_size", 0) if isinstance(constraints, dict) else 0
    if square:
        raise TeacherConfigError(
            f"the LazyConfig teacher '{shown_name}' pads every image to a {square} x {square} square "
            "(its backbone's square_pad), the student only to its size divisibility: their "
            "feature maps would differ in size. Add 'model.backbone.square_pad=0' to "
            "DISTILL.TEACHER.OPTS (the teacher then pads as the student does)"
        )
