"""Turn a distillation checkpoint into a plain detectron2 release of the student.

A release is a directory holding

* ``<name>_<md5[:6]>.pth``: the student's weights (named like detectron2's model zoo files: a
  content-hash suffix, so a changed file never hides behind an old name);
* ``config.yaml``: a stock detectron2 config (no ``DISTILL`` node, the plain
  meta-architecture) whose ``MODEL.WEIGHTS`` names the weights *relative to the config's
  folder* (so the release loads from wherever it is copied: :func:`load_release_config`, or
  the snippet at the top of the file), with a comment at its top saying what a consumer needs;
* only when the student uses a component that stock detectron2 lacks and no stock builder
  can express (e.g. d2kd's narrow ResNet-18 backbone): a copy of the module that registers
  it, which needs nothing but detectron2. Where a stock builder builds the very same model
  (``build_basic_resnet_fpn_backbone`` at ``RES2_OUT_CHANNELS: 64`` is detectron2's
  ``build_resnet_fpn_backbone``), the config names the stock one instead;
* with ``formats=("torchscript",)``: ``<name>_<md5[:6]>.ts``, the traced student (d2kd.deploy),
  published only when it predicts what the eager student predicts;
* ``release.json``, the manifest: every file of the release with its md5, the TorchScript
  contract, what a consumer needs, and what the publisher adds (metrics, teacher, ...). An
  export replaces only a directory whose manifest lists exactly its files: it never deletes
  what it cannot prove it wrote.

How it is written (:func:`write_release`): everything is validated in memory first (the
checkpoint reads, its weights fit the student the config describes, the config loads in a
stock ``get_cfg()``); then the files are written into a temporary directory beside the
target, ``<output_dir>.tmp.<pid>``, flushed to disk, optionally checked there, and the
directory is renamed to ``<output_dir>``. A rename is atomic, so a consumer sees no release
or a complete one, never some of its files; a failed check or a crash leaves the target as
it was (a kill leaves the temporary directory, removed by the next export). Replacing an
earlier release takes two renames (the old one aside, the new one in); a kill between them
leaves the old release in ``<output_dir>.old.tmp.<pid>``.
"""
import ast
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from .checkpoint import (
    DISTILL_STATE_PREFIXES,
    AtomicDetectionCheckpointer,
    IncompatibleCheckpointError,
    describe_load_error,
)
from . import deploy
from .modeling.kinds import is_distill_meta_arch, plain_meta_arch_of
from .utils.atomic import TEMPORARY_NAME, fsync_directory, pid_is_alive, temporary_path

logger = logging.getLogger(__name__)

__all__ = [
    "student_config", "student_state_dict", "d2kd_components", "prepare_release", "write_release",
    "export_student", "export_release", "ExportResult", "StudentCheckpointer", "build_student",
    "verification_images", "student_predictions", "check_release", "load_release_config",
    "read_manifest", "ExportError", "ReleaseCheckError", "MANIFEST",
]

# The manifest every release carries (see the module docstring).
MANIFEST = "release.json"
MANIFEST_FORMAT = "d2kd-release/1"


class ExportError(ValueError):
    """The export cannot produce a release (the message says why); nothing was written."""


class ReleaseCheckError(RuntimeError):
    """Stock detectron2 does not load the release, or predicts differently; not published."""


def student_config(cfg: CfgNode) -> CfgNode:
    """The student's own config: a vanilla meta-architecture and no ``DISTILL`` node. A plain
    detector's config (a teacher, or a student trained alone) is its own student."""
    out = cfg.clone()
    out.defrost()
    if is_distill_meta_arch(cfg.MODEL.META_ARCHITECTURE):
        out.MODEL.META_ARCHITECTURE = plain_meta_arch_of(cfg.MODEL.META_ARCHITECTURE)
    if "DISTILL" in out:
        del out["DISTILL"]
    return out


def student_state_dict(checkpoint_path: str) -> dict:
    """The student's weights from a d2kd training checkpoint (adapters and prototypes dropped)."""
    try:
        # weights_only: a release tool must not execute code from the file it converts
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"could not read the distillation checkpoint '{checkpoint_path}' ({describe_load_error(e)}); "
            "it is corrupt, truncated, or not a d2kd checkpoint"
        ) from None  # torch's own text advises weights_only=False: never shown
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise RuntimeError(f"'{checkpoint_path}' holds no model weights")
    return {k: v for k, v in state.items() if not k.startswith(DISTILL_STATE_PREFIXES)}


class StudentCheckpointer(AtomicDetectionCheckpointer):
    """Loads a d2kd training checkpoint into the plain student (safely, see
    AtomicDetectionCheckpointer), leaving out what belongs to distillation (adapters,
    prototypes) instead of reporting it as unexpected keys."""

    def _load_model(self, checkpoint):
        model_state = checkpoint.get("model", {})
        checkpoint["model"] = {k: v for k, v in model_state.items() if not k.startswith(DISTILL_STATE_PREFIXES)}
        return super()._load_model(checkpoint)


def build_student(cfg: CfgNode):
    """The student of a distillation config as the plain detector it is, without building or
    loading the teacher (evaluation and export never run it); weights not loaded."""
    return build_model(student_config(cfg))


# ---------------------------------------------------------------------------------------------
# Components only d2kd registers


def _registries():
    from detectron2.modeling import (
        ANCHOR_GENERATOR_REGISTRY,
        BACKBONE_REGISTRY,
        META_ARCH_REGISTRY,
        PROPOSAL_GENERATOR_REGISTRY,
        ROI_HEADS_REGISTRY,
    )
    from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY
    from detectron2.modeling.roi_heads.box_head import ROI_BOX_HEAD_REGISTRY
    from detectron2.modeling.roi_heads.keypoint_head import ROI_KEYPOINT_HEAD_REGISTRY
    from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY

    return [
        ("MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY),
        ("MODEL.BACKBONE.NAME", BACKBONE_REGISTRY),
        ("MODEL.PROPOSAL_GENERATOR.NAME", PROPOSAL_GENERATOR_REGISTRY),
        ("MODEL.RPN.HEAD_NAME", RPN_HEAD_REGISTRY),
        ("MODEL.ANCHOR_GENERATOR.NAME", ANCHOR_GENERATOR_REGISTRY),
        ("MODEL.ROI_HEADS.NAME", ROI_HEADS_REGISTRY),
        ("MODEL.ROI_BOX_HEAD.NAME", ROI_BOX_HEAD_REGISTRY),
        ("MODEL.ROI_MASK_HEAD.NAME", ROI_MASK_HEAD_REGISTRY),
        ("MODEL.ROI_KEYPOINT_HEAD.NAME", ROI_KEYPOINT_HEAD_REGISTRY),
    ]


def _stock_basic_resnet_fpn(cfg) -> Optional[str]:
    # d2kd's builder is detectron2's build_resnet_backbone + FPN + LastLevelMaxPool, minus the
    # RES2_OUT_CHANNELS == 64 pin; with the pin satisfied (and the keys the stock builder
    # asserts on at their R-18/34 values) both build the same modules under the same names.
    r = cfg.MODEL.RESNETS
    if r.DEPTH in (18, 34) and r.RES2_OUT_CHANNELS == 64 and r.NUM_GROUPS == 1 \
            and r.RES5_DILATION == 1 and not any(r.DEFORM_ON_PER_STAGE):
        return "build_resnet_fpn_backbone"
    return None


# d2kd component -> function of the config giving the stock builder that builds the same model
# (None where there is none). build_basic_resnet_retinanet_fpn_backbone has none at any width:
# detectron2's RetinaNet builder computes P6 from res5, d2kd's (like the GK authors') from P5.
STOCK_EQUIVALENTS: Dict[str, Callable[[CfgNode], Optional[str]]] = {
    "build_basic_resnet_fpn_backbone": _stock_basic_resnet_fpn,
}


@dataclass
class Component:
    """A registry name in the student's config that d2kd registers."""

    key: str  # config key, e.g. MODEL.BACKBONE.NAME
    name: str  # its value
    module: str  # the module that registers it
    file: str  # that module's source file
    stock: Optional[str] = None  # a stock name that builds the same model, if any
    self_contained: bool = False  # the module imports nothing from d2kd: it can ship as a copy


def _imports_only_outside_d2kd(path: str) -> bool:
    tree = ast.parse(open(path).read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "d2kd" for a in node.names):
            return False
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] == "d2kd"):
            return False
    return True


def d2kd_components(cfg: CfgNode) -> List[Component]:
    """The registry names in ``cfg`` (a student config) that d2kd, not detectron2, registers."""
    found = []
    for key, registry in _registries():
        node = cfg
        for part in key.split("."):
            node = node[part]
        name = node
        if not isinstance(name, str) or name not in registry:
            continue  # unused keys may hold anything; build_model reports a used unknown name
        obj = registry.get(name)
        module = getattr(obj, "__module__", "") or ""
        if module.split(".")[0] != "d2kd":
            continue
        path = getattr(sys.modules.get(module), "__file__", "") or ""
        stock = STOCK_EQUIVALENTS.get(name, lambda c: None)(cfg)
        found.append(Component(key, name, module, path, stock, bool(path) and _imports_only_outside_d2kd(path)))
    return found


# ---------------------------------------------------------------------------------------------
# Building a release in memory (validation) and writing it


@dataclass
class Release:
    """A validated release, not yet written."""

    config: CfgNode  # the stock config; MODEL.WEIGHTS is set when written
    weights: bytes
    weights_name: str
    modules: Dict[str, str] = field(default_factory=dict)  # file name in the release -> source path
    components: List[Component] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # what a consumer needs, one line each
    extra_keys: List[str] = field(default_factory=list)  # non-stock config keys kept (needs d2kd)
    torchscript: Optional[bytes] = None  # the traced student (d2kd.deploy), if exported
    torchscript_name: str = ""
    info: Dict[str, Any] = field(default_factory=dict)  # manifest entries a publisher adds

    @property
    def needs_modules(self) -> bool:
        return any(c.stock is None for c in self.components)

    @property
    def needs_d2kd(self) -> bool:
        return any(c.stock is None and not c.self_contained for c in self.components)


def _check_fits(model, state: dict) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise IncompatibleCheckpointError(missing, unexpected, wrong)


def prepare_release(cfg: CfgNode, checkpoint_path: str, name: str = "model_final") -> Release:
    """Everything a release holds, validated; nothing is written.

    Raises ExportError (or RuntimeError for an unreadable checkpoint) when the checkpoint
    does not fit the student the config describes or the config is not a stock one.
    """
    state = student_state_dict(checkpoint_path)
    scfg = student_config(cfg)
    scfg.MODEL.WEIGHTS = ""
    components = d2kd_components(scfg)
    for c in components:
        if c.stock is not None:
            node = scfg
            *parents, leaf = c.key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = c.stock
    needs_d2kd = any(c.stock is None and not c.self_contained for c in components)
    extra = non_stock_keys(scfg)
    if not needs_d2kd:
        # keys d2kd adds to every config (e.g. MODEL.GFL) that no stock component reads
        for key in extra:
            *parents, leaf = key.split(".")
            node = scfg
            for part in parents:
                node = node[part]
            del node[leaf]
    try:
        model = build_model(scfg)
    except Exception as e:
        raise ExportError(f"cannot build the student the config describes ({type(e).__name__}: {e})") from e
    try:
        _check_fits(model, state)
    except IncompatibleCheckpointError as e:
        raise ExportError(
            f"the checkpoint '{checkpoint_path}' does not fit the student that the config describes "
            f"({e}). Pass the config the run was trained with (its OUTPUT_DIR/config.yaml)"
        ) from None
    del model
    if not needs_d2kd:
        try:
            stock = get_cfg()  # stock detectron2: any key it lacks is an error here, not for a consumer
            stock.merge_from_other_cfg(CfgNode.load_cfg(scfg.dump()))
        except Exception as e:
            raise ExportError(f"the student's config does not load in stock detectron2: {e}") from e

    buffer = io.BytesIO()
    torch.save({"model": state, "__author__": "d2kd export_student"}, buffer)
    data = buffer.getvalue()
    weights_name = f"{name}_{hashlib.md5(data).hexdigest()[:6]}.pth"

    release = Release(config=scfg, weights=data, weights_name=weights_name, components=components)
    for c in components:
        if c.stock is not None:
            release.notes.append(
                f"{c.key}: stock {c.stock} builds the same model as d2kd's {c.name}; the config names it"
            )
        elif needs_d2kd:
            release.notes.append(f"{c.key} = {c.name} is not in stock detectron2: `import {c.module}` registers it")
        elif c.self_contained:
            copy = os.path.basename(c.file)
            release.modules[copy] = c.file
            release.notes.append(
                f"{c.key} = {c.name} is not in stock detectron2: register it before building the model "
                f"with `import runpy; runpy.run_path('<release>/{copy}')` (a copy of {c.module}, "
                "which needs only detectron2), or `import d2kd`"
            )
        else:
            release.notes.append(
                f"{c.key} = {c.name} is not in stock detectron2 and its module {c.module} needs d2kd: "
                f"install d2kd and `import {c.module}` before building the model"
            )
    if needs_d2kd and extra:
        release.extra_keys = extra
        release.notes.append(
            f"the config has keys stock detectron2 lacks ({', '.join(extra)}): read it with "
            "`from d2kd.config import add_distill_config; cfg = get_cfg(); add_distill_config(cfg); "
            "cfg.merge_from_file(...)`"
        )
    return release


def non_stock_keys(cfg: CfgNode, stock: Optional[CfgNode] = None, prefix: str = "") -> List[str]:
    """Dotted names of the keys (top-most) of ``cfg`` that a stock ``get_cfg()`` lacks."""
    stock = get_cfg() if stock is None else stock
    out = []
    for key, value in cfg.items():
        if key not in stock:
            out.append(prefix + key)
        elif isinstance(value, CfgNode) and isinstance(stock[key], CfgNode):
            out.extend(non_stock_keys(value, stock[key], f"{prefix}{key}."))
    return out


def release_header(release: Release) -> str:
    """The comment at the top of a release's config.yaml: what a consumer needs, and the
    loading snippet (paths are relative to the config's folder)."""
    meta = release.config.MODEL.META_ARCHITECTURE
    lines = [f"# A detector exported by d2kd (d2kd.export): a plain detectron2 {meta}."]
    if not release.needs_modules:
        lines.append("# Loads in stock detectron2, no d2kd needed.")
    else:
        lines.append("# NEEDS more than stock detectron2 -- before building the model:")
    for c in release.components:
        if c.stock is not None:
            lines.append(f"# {c.key}: stock {c.stock} builds the same model as d2kd's {c.name}.")
        elif release.needs_d2kd:
            lines.append(f"# {c.key} = {c.name} comes from {c.module}: `import {c.module}`.")
        elif c.self_contained:
            copy = os.path.basename(c.file)
            lines.append(f"# {c.key} = {c.name} is registered by {copy} beside this file (a copy of")
            lines.append(f"# {c.module}; needs only detectron2). Run it first:")
            lines.append(f"#     import runpy; runpy.run_path(os.path.join(os.path.dirname(path), {copy!r}))")
            lines.append("# (or, with d2kd installed, `import d2kd`).")
        else:
            lines.append(f"# {c.key} = {c.name} comes from {c.module}, which needs d2kd: `import {c.module}`.")
    if release.extra_keys:
        lines.append(f"# Keys stock detectron2 lacks ({', '.join(release.extra_keys)}): read this file with")
        lines.append("#     from d2kd.config import add_distill_config")
        lines.append("#     cfg = get_cfg(); add_distill_config(cfg); cfg.merge_from_file(path)")
        lines.append("# then resolve MODEL.WEIGHTS as below (or: d2kd.export.load_release_config(path)).")
    else:
        lines.append("# Paths in this file are relative to its folder; load it from wherever it is copied with")
        lines.append("#     cfg = get_cfg(); cfg.merge_from_file(path)")
    lines.append("#     cfg.MODEL.WEIGHTS = os.path.join(os.path.dirname(path), cfg.MODEL.WEIGHTS)")
    lines.append("#     predictor = DefaultPredictor(cfg)")
    return "\n".join(lines) + "\n"


def load_release_config(config_path: str) -> CfgNode:
    """A release's ``config.yaml`` read as the header says: d2kd's extra keys known, and
    ``MODEL.WEIGHTS`` resolved against the config's folder (a release can be moved)."""
    from .config import add_distill_config

    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.merge_from_file(config_path)
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isabs(weights):
        cfg.MODEL.WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(config_path)), weights)
    return cfg


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest of the release in ``directory``, or None when it has none (or not one
    d2kd can read)."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def _stale_release_temporaries(out: str) -> None:
    parent, base = os.path.split(out)
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        match = TEMPORARY_NAME.match(entry)
        if match and entry.startswith(base + ".") and not pid_is_alive(int(match.group("pid"))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` may be new, empty, or a release this tool wrote (its manifest lists
    exactly the files it holds), which a new release replaces whole. Anything else is refused
    before any writing: an export never deletes what it cannot prove it wrote."""
    out = os.path.abspath(output_dir)
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ExportError(f"--output-dir {output_dir} exists and is not a directory")
    entries = sorted(os.listdir(out))
    if not entries:
        return
    manifest = read_manifest(out)
    if manifest is None:
        raise ExportError(
            f"--output-dir {output_dir} is not a release d2kd wrote (it has no {MANIFEST}) and holds "
            f"{', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}; an export replaces the whole "
            "directory, so nothing was written: choose a new or empty folder"
        )
    foreign = [e for e in entries if e != MANIFEST and e not in manifest["files"]]
    if foreign:
        raise ExportError(
            f"--output-dir {output_dir} is a d2kd release, but also holds files the release did not "
            f"write ({', '.join(foreign[:5])}); an export replaces the whole directory, so nothing was "
            "written: move those files out, or choose a new or empty folder"
        )


def write_release(release: Release, output_dir: str,
                  check: Optional[Callable[[str, str, str], None]] = None) -> Tuple[str, str]:
    """Write ``release`` into ``output_dir`` as a set (see the module docstring).

    ``check(directory, config_path, weights_path)`` runs on the complete temporary directory
    before it is published; if it raises, nothing is published.

    Returns:
        (weights path, config path) at their final place.
    """
    out = os.path.abspath(output_dir)
    check_output_dir(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    _stale_release_temporaries(out)
    tmp = temporary_path(out)
    weights_path = os.path.join(out, release.weights_name)
    config_path = os.path.join(out, "config.yaml")
    try:
        os.makedirs(tmp)
        files = {release.weights_name: release.weights}
        if release.torchscript is not None:
            files[release.torchscript_name] = release.torchscript
        for copy, source in release.modules.items():
            with open(source, "rb") as f:
                files[copy] = f.read()
        cfg = release.config.clone()
        cfg.MODEL.WEIGHTS = release.weights_name  # relative to the config's folder: movable
        files["config.yaml"] = (release_header(release) + cfg.dump()).encode()
        files[MANIFEST] = json.dumps(_manifest(release, files), indent=1).encode()
        for file_name, data in files.items():
            with open(os.path.join(tmp, file_name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_directory(tmp)
        if check is not None:
            check(tmp, os.path.join(tmp, "config.yaml"), os.path.join(tmp, release.weights_name))
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        if os.path.exists(out):
            old = temporary_path(out + ".old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_directory(parent)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"Exported the student to {weights_path} and {config_path}")
    log = logger.warning if release.needs_modules else logger.info
    for note in release.notes:
        log(note)
    return weights_path, config_path


def _manifest(release: Release, files: Dict[str, bytes]) -> dict:
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {name: hashlib.md5(data).hexdigest() for name, data in sorted(files.items())},
        "weights": release.weights_name,
        "config": "config.yaml",
        "meta_architecture": release.config.MODEL.META_ARCHITECTURE,
        "needs": release.notes or ["stock detectron2 only"],
        "torchscript": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if release.torchscript is not None:
        manifest["torchscript"] = {
            "file": release.torchscript_name,
            "input": f"float (3, H, W) in INPUT.FORMAT {release.config.INPUT.FORMAT}, resized by "
                     f"ResizeShortestEdge({release.config.INPUT.MIN_SIZE_TEST}, {release.config.INPUT.MAX_SIZE_TEST})",
            "outputs": list(deploy.TORCHSCRIPT_OUTPUTS),
            "device": release.config.MODEL.DEVICE,
        }
    manifest.update(release.info)
    return manifest


def export_student(cfg: CfgNode, checkpoint_path: str, output_dir: str, name: str = "model_final",
                   check: Optional[Callable[[str, str, str], None]] = None) -> Tuple[str, str]:
    """Validate, then write ``<name>_<md5[:6]>.pth`` and ``config.yaml`` (and any module the
    student needs) into ``output_dir`` as a set. Nothing is written when validation fails.

    Returns:
        (weights path, config path)
    """
    check_output_dir(output_dir)
    release = prepare_release(cfg, checkpoint_path, name)
    return write_release(release, output_dir, check)


# ---------------------------------------------------------------------------------------------
# Verification: the release in a process that never imports d2kd

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def verification_images(cfg: CfgNode, dataset: Optional[str] = None, images_dir: Optional[str] = None,
                        num_images: int = 8) -> List[str]:
    """Image files to compare predictions on: the first ``num_images`` of ``images_dir``, or
    of ``dataset`` (default: DATASETS.TEST[0], else DATASETS.TRAIN[0]). Checked to exist."""
    if images_dir:
        if not os.path.isdir(images_dir):
            raise ExportError(f"--images {images_dir} is not a directory")
        files = sorted(os.path.join(images_dir, f) for f in os.listdir(images_dir)
                       if f.lower().endswith(IMAGE_EXTENSIONS))[:num_images]
        if not files:
            raise ExportError(f"--images {images_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
        return files
    from detectron2.data import DatasetCatalog

    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    name = dataset or (names[0] if names else None)
    if name is None:
        raise ExportError("the config names no dataset to verify on: pass --dataset NAME or --images DIR")
    if name not in DatasetCatalog.list():
        raise ExportError(
            f"dataset '{name}' is not registered, so --verify has no images. Pass --register FILE "
            "(the script that registers it for train_net, see datasets/README.md; its `if __name__ "
            "== '__main__'` part is not run), or --images DIR (a folder of images)"
        )
    files = [r["file_name"] for r in DatasetCatalog.get(name)[:num_images]]
    for f in files:
        if not os.path.isfile(f):
            raise ExportError(f"image {f} of dataset '{name}' does not exist")
    if not files:
        raise ExportError(f"dataset '{name}' is empty")
    return files


def load_student_predictor(cfg: CfgNode, checkpoint_path: str):
    """detectron2's DefaultPredictor on the student (d2kd-built, weights from the distillation
    checkpoint, no teacher)."""
    from detectron2.engine import DefaultPredictor

    scfg = student_config(cfg)
    scfg.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(scfg)
    StudentCheckpointer(predictor.model).load(checkpoint_path)
    return predictor


def _read_images(image_files: Sequence[str]):
    import cv2

    for f in image_files:
        image = cv2.imread(f)
        if image is None:
            raise ExportError(f"cannot read image {f}")
        yield image


def student_predictions(cfg: CfgNode, checkpoint_path: str, image_files: Sequence[str], predictor=None) -> List[dict]:
    """The student's predictions on ``image_files`` through detectron2's DefaultPredictor
    pre-processing (``predictor``: one from load_student_predictor, else built here)."""
    predictor = predictor or load_student_predictor(cfg, checkpoint_path)
    return deploy.as_prediction_dicts([predictor(image)["instances"].to("cpu") for image in _read_images(image_files)])


def add_torchscript(release: Release, predictor, image_files: Sequence[str], expected: List[dict],
                    tolerance: float = deploy.DEFAULT_TOLERANCE) -> float:
    """Trace the student (``predictor.model``) into ``release`` as ``<name>_<md5[:6]>.ts`` and
    check it predicts ``expected`` on ``image_files``; returns the largest difference.

    Raises:
        ExportError: the traced model predicts differently (nothing is published).
    """
    import cv2

    name = release.weights_name.rsplit("_", 1)[0]
    sample = deploy.test_time_input(cv2.imread(image_files[0]), release.config)
    data = deploy.trace_student(predictor.model, sample)
    traced = deploy.TorchScriptPredictor(io.BytesIO(data), release.config)
    try:
        worst = deploy.predictions_difference(expected, [traced(im) for im in _read_images(image_files)],
                                              image_files, tolerance)
    except deploy.ParityError as e:
        raise ExportError(f"the TorchScript student does not predict what the eager student predicts: {e}; "
                          "nothing was published") from None
    release.torchscript = data
    release.torchscript_name = f"{name}_{hashlib.md5(data).hexdigest()[:6]}.ts"
    return worst


@dataclass
class ExportResult:
    """Where :func:`export_release` put the release, and what its checks saw."""

    weights_path: str
    config_path: str
    release: Release
    torchscript_path: Optional[str] = None
    check: Dict[str, Any] = field(default_factory=dict)  # check_release's result (verify)


def export_release(cfg: CfgNode, checkpoint_path: str, output_dir: str, *, name: str = "model_final",
                   images: Optional[Sequence[str]] = None, formats: Sequence[str] = (),
                   info: Optional[Dict[str, Any]] = None, tolerance: float = deploy.DEFAULT_TOLERANCE) -> ExportResult:
    """The whole export: validate, trace the ``formats`` asked for, check, then publish.

    With ``images`` the release is verified before it is published (:func:`check_release`:
    a process without d2kd loads it strictly and must predict what the student predicts,
    the TorchScript file included). ``"torchscript"`` in ``formats`` needs ``images``.
    ``info`` goes into the manifest (e.g. metrics). Nothing is written when a check fails.
    """
    unknown = [f for f in formats if f not in deploy.FORMATS]
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; d2kd exports {list(deploy.FORMATS)} "
                          "(see the README, 'Deployment formats')")
    if formats and not images:
        raise ExportError("--format torchscript is checked against the eager student on images: pass "
                          "--images DIR or --dataset NAME (or a config whose DATASETS.TEST has one)")
    check_output_dir(output_dir)
    release = prepare_release(cfg, checkpoint_path, name)
    release.info.update(info or {})
    check, result = None, {}  # check: set below when there are images to verify on
    if images:
        predictor = load_student_predictor(cfg, checkpoint_path)
        expected = student_predictions(cfg, checkpoint_path, images, predictor)
        if "torchscript" in formats:
            result["torchscript_max_difference"] = add_torchscript(release, predictor, images, expected, tolerance)
        del predictor

        def verify(directory, config_path, weights_path):
            modules = [os.path.join(directory, m) for m in release.modules]
            imports = [c.module for c in release.components if c.stock is None and not c.self_contained]
            torchscript = os.path.join(directory, release.torchscript_name) if release.torchscript else ""
            result.update(check_release(config_path, weights_path, modules, images, expected,
                                        allow_d2kd=release.needs_d2kd, imports=imports,
                                        d2kd_config=bool(release.extra_keys), torchscript=torchscript,
                                        tolerance=tolerance))

        check = verify
    weights_path, config_path = write_release(release, output_dir, check)
    ts_path = os.path.join(os.path.dirname(config_path), release.torchscript_name) if release.torchscript else None
    return ExportResult(weights_path, config_path, release, ts_path, result)


# Runs in a fresh interpreter with stock detectron2 only: d2kd imports are blocked.
RELEASE_CHECK_SCRIPT = r"""
import importlib, importlib.abc, json, os, runpy, sys

args = json.loads(sys.argv[1])


class NoD2kd(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "d2kd" or name.startswith("d2kd."):
            raise ImportError(f"{name} was imported: the release must load without d2kd")
        return None


if not args["allow_d2kd"]:
    sys.meta_path.insert(0, NoD2kd())

import cv2
import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model


def fail(message):
    print("release check failed: " + message, file=sys.stderr)
    sys.exit(3)


for module in args["modules"]:
    runpy.run_path(module)  # registers what the config needs, as a consumer would
for name in args["imports"]:
    importlib.import_module(name)  # a release that says it needs d2kd
path = args["config"]
cfg = get_cfg()
if args["d2kd_config"]:
    from d2kd.config import add_distill_config

    add_distill_config(cfg)
cfg.merge_from_file(path)
# the loading snippet of the config's header, word for word: paths relative to the config
cfg.MODEL.WEIGHTS = os.path.join(os.path.dirname(path), cfg.MODEL.WEIGHTS)
if os.path.abspath(cfg.MODEL.WEIGHTS) != os.path.abspath(args["weights"]):
    fail(f"MODEL.WEIGHTS resolves to {cfg.MODEL.WEIGHTS}, not to the release's weights")
cfg.freeze()
state = torch.load(args["weights"], map_location="cpu", weights_only=True)["model"]
own = build_model(cfg).state_dict()
missing = sorted(set(own) - set(state))
unexpected = sorted(set(state) - set(own))
wrong = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
if missing or unexpected or wrong:
    fail(f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
predictor = DefaultPredictor(cfg)
expected = torch.load(args["expected"], weights_only=True)
# d2kd/deploy.py by its path (it imports only torch and detectron2): how a TorchScript
# consumer resizes, calls and rescales, and the one comparison of predictions
deployment = runpy.run_path(args["deploy_module"])
predictors = [("eager", lambda image: predictor(image)["instances"].to("cpu"))]
if args["torchscript"]:
    predictors.append(("torchscript", deployment["TorchScriptPredictor"](args["torchscript"], cfg)))
report = {"images": len(args["images"])}
for label, predict in predictors:
    got = [predict(cv2.imread(file)) for file in args["images"]]
    report["detections"] = sum(len(i) for i in got)
    try:
        worst = deployment["predictions_difference"](expected, got, args["images"], args["tolerance"])
    except deployment["ParityError"] as e:
        fail(f"{label}: {e}")
    report["max_difference" if label == "eager" else "torchscript_max_difference"] = worst
report["d2kd_imported"] = any(m == "d2kd" or m.startswith("d2kd.") for m in sys.modules)
print("D2KD_RELEASE_CHECK " + json.dumps(report))
"""


def check_release(config_path: str, weights_path: str, module_paths: Sequence[str], image_files: Sequence[str],
                  expected: List[dict], allow_d2kd: bool = False, tolerance: float = deploy.DEFAULT_TOLERANCE,
                  timeout: float = 600, imports: Sequence[str] = (), d2kd_config: bool = False,
                  torchscript: str = "") -> dict:
    """Load the release in a separate Python process with stock detectron2 only (any d2kd
    import fails there, unless ``allow_d2kd`` for a release that says it needs d2kd: then
    ``imports`` are imported and ``d2kd_config`` adds d2kd's config keys), strictly (no
    missing, unexpected or mis-shaped key), with the loading snippet of the config's header,
    run DefaultPredictor on ``image_files`` and compare with ``expected``; the same for the
    ``torchscript`` file when given (boxes in pixels and scores within ``tolerance``, classes
    equal).

    Returns:
        {"images", "detections", "max_difference", "d2kd_imported"[, "torchscript_max_difference"]}
    """
    with tempfile.TemporaryDirectory(prefix="d2kd_release_check_") as work:
        expected_path = os.path.join(work, "expected.pth")
        torch.save(list(expected), expected_path)
        args = {"config": config_path, "weights": weights_path, "modules": list(module_paths),
                "images": [os.path.abspath(f) for f in image_files], "expected": expected_path,
                "allow_d2kd": allow_d2kd, "tolerance": tolerance, "imports": list(imports),
                "d2kd_config": d2kd_config, "torchscript": torchscript, "deploy_module": deploy.__file__}
        proc = subprocess.run(
            [sys.executable, "-c", RELEASE_CHECK_SCRIPT, json.dumps(args)],
            cwd=work, capture_output=True, text=True, timeout=timeout,
        )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("D2KD_RELEASE_CHECK ")]
    if proc.returncode != 0 or not lines:
        raise ReleaseCheckError(
            "stock detectron2 (a separate process without d2kd) does not load the release or predicts "
            f"differently; nothing was published:\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1].split(" ", 1)[1])
