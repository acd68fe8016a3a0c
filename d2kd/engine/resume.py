"""What a resume must not do silently: continue with another distillation set-up, another
teacher, or past SOLVER.MAX_ITER.

Every training checkpoint carries a record of the run's distillation set-up (meta-architecture,
heads, their config values, the teacher's weights with their SHA-256). On ``--resume`` it is
compared with the config's model, and the heads' parameters and buffers in the checkpoint's
model state with the model's, by name and shape (so checkpoints without a record are checked too):

* another meta-architecture, other ``DISTILL.HEADS`` or distillation state of other names or
  shapes (e.g. other ``GK.STRIDES``) is refused, saying what changed and how to start a new run
  from the checkpoint's weights. Loading it would fail in PyTorch's optimizer, at the first step,
  or not at all while training with the wrong adapters;
* another teacher (by content, not path) is a loud warning: training goes on with the new
  teacher, and a prototype bank built with the old one is rebuilt at the next step (PGM picks
  prototypes by the teacher-student consistency, so the old picks belong to the old teacher);
* other values of the same heads (weights, temperatures, ...) are a warning listing them.
"""
import hashlib
import logging
import os
from functools import lru_cache
from typing import Dict, List, Optional

from ..checkpoint import AtomicDetectionCheckpointer
from ..config import DEFAULT_TEACHER
from ..value_checks import distill_nodes

logger = logging.getLogger(__name__)

RECORD_KEY = "distill_setup"
HEADS_PREFIX = "distill_heads."
# Config names whose values shape a head's parameters (named when those differ).
STRUCTURAL = ("STRIDES", "ADAPTER", "NUM_LEVELS")


class ResumeMismatchError(ValueError):
    """``--resume`` with a config whose distillation set-up differs from the checkpoint's."""


class ResumePastMaxIterError(ValueError):
    """``--resume`` from a checkpoint past ``SOLVER.MAX_ITER``: nothing would be trained."""


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content, computed once per (path, size, mtime)."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _plain(value):
    """A config value as a type ``torch.load(weights_only=True)`` reads (lists, not tuples)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):  # a CfgNode is a class torch.load(weights_only=True) refuses
        return {k: _plain(v) for k, v in value.items()}
    return value


def setup_record(model, cfg) -> dict:
    """The distillation set-up of ``model`` (built from ``cfg``), as saved in checkpoints."""
    distill = hasattr(model, "distill_heads")
    values = {}
    if distill:
        for path in distill_nodes(cfg):
            node = cfg
            for part in path.split("."):
                node = node.get(part) if node is not None else None
            for name, value in (node or {}).items():
                values[f"{path}.{name}"] = _plain(value)
    teacher = None
    if distill and getattr(model, "teacher_weights_file", None):
        teacher = {"weights": cfg.DISTILL.TEACHER.WEIGHTS, "sha256": _sha_or_unknown(model.teacher_weights_file)}
    record = {
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "heads": sorted(model.distill_heads) if distill else [],
        "values": values,
        "teacher": teacher,
    }
    # DISTILL.TEACHERS: each named teacher as "teacher" records the default one (a single-teacher
    # run's record has no such entry, as before)
    slots = model.teacher_slots() if distill and hasattr(model, "teacher_slots") else {}
    named = {name: {"weights": cfg.DISTILL.TEACHERS[name].WEIGHTS, "sha256": _sha_or_unknown(slot.weights_file)}
             for name, slot in slots.items() if name in cfg.DISTILL.get("TEACHERS", {}) and slot.weights_file}
    if named:
        record["teachers"] = named
    return record


def _sha_or_unknown(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError:  # e.g. a download cache cleaned since the teacher was loaded: unknown
        return ""


def _heads_state(state: Dict) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if k.startswith(HEADS_PREFIX)}


def _shown(key: str, value) -> str:
    return "[] (every stride both models have)" if key.endswith("STRIDES") and value == [] else str(value)


def _first(keys: List[str], n: int = 2) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def setup_changes(saved: Optional[dict], saved_state: Dict, current: dict, model) -> List[str]:
    """What makes the checkpoint's set-up another than the model's (empty: the same).
    ``saved`` may be None (a checkpoint written before d2kd recorded set-ups)."""
    changes = []
    if saved is not None:
        if saved["meta_architecture"] != current["meta_architecture"]:
            changes.append(f"MODEL.META_ARCHITECTURE: {saved['meta_architecture']} in the checkpoint, "
                           f"{current['meta_architecture']} now")
        if saved["heads"] != current["heads"]:
            changes.append(f"DISTILL.HEADS: {saved['heads'] or 'none (no distillation)'} in the checkpoint, "
                           f"{current['heads'] or 'none (no distillation)'} now")
    old, new = _heads_state(saved_state), _heads_state(model.state_dict())
    if old != new:
        if saved is not None and saved["heads"] == current["heads"]:
            # the keys that shape a head's parameters, where they differ
            for key, value in sorted(saved["values"].items()):
                now = current["values"].get(key, value)
                if now != value and any(w in key.rsplit(".", 1)[-1] for w in STRUCTURAL):
                    changes.append(f"{key}: {_shown(key, value)} in the checkpoint, {_shown(key, now)} now")
            if teacher_change(saved, current):
                changes.append("DISTILL.TEACHER.WEIGHTS: another teacher (its channels shape the adapters)")
            for name in sorted(current.get("teachers") or {}):
                if teacher_change(saved, current, name):
                    changes.append(f"DISTILL.TEACHERS.{name}.WEIGHTS: another teacher (its channels shape the adapters)")
        absent = sorted(set(old) - set(new))
        added = sorted(set(new) - set(old))
        reshaped = sorted(k for k in set(old) & set(new) if old[k] != new[k])
        parts = [f"{len(absent)} of the checkpoint's absent now ({_first(absent)})" if absent else "",
                 f"{len(added)} new ({_first(added)})" if added else "",
                 f"{len(reshaped)} of another shape ({_first(reshaped)})" if reshaped else ""]
        changes.append("distillation parameters and buffers: " + "; ".join(p for p in parts if p))
    return changes


def value_changes(saved: Optional[dict], current: dict) -> List[str]:
    if saved is None:
        return []
    return [f"{k} {v} -> {current['values'][k]}" for k, v in sorted(saved["values"].items())
            if k in current["values"] and current["values"][k] != v]


def teacher_change(saved: Optional[dict], current: dict, name: str = "") -> str:
    """The warning for a checkpoint trained with another teacher ("" if the same or unknown);
    ``name``: that of a named teacher (DISTILL.TEACHERS) instead of the default one."""
    if name:
        old = ((saved or {}).get("teachers") or {}).get(name)
        new = (current.get("teachers") or {}).get(name)
    else:
        old, new = (saved or {}).get("teacher"), current.get("teacher")
    if not old or not new or not old.get("sha256") or not new.get("sha256") or old["sha256"] == new["sha256"]:
        return ""
    key = f"DISTILL.TEACHERS.{name}" if name else "DISTILL.TEACHER"
    which = f"THE TEACHER {key}" if name else "THE TEACHER"
    return (f"{which} CHANGED SINCE THIS CHECKPOINT: it was trained with {key}.WEIGHTS = "
            f"'{old['weights']}' (sha256 {old['sha256'][:12]}), this run's teacher is '{new['weights']}' "
            f"(sha256 {new['sha256'][:12]}), another file content. Training goes on with the new teacher")


class DistillCheckpointer(AtomicDetectionCheckpointer):
    """The trainer's checkpointer: saves the set-up record with every checkpoint and, on a
    resume (a load of every checkpointable), checks it before anything is loaded."""

    def __init__(self, model, save_dir="", *, cfg, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.cfg = cfg
        self._resuming_from = ""

    def save(self, name: str, **kwargs) -> None:
        if self.save_dir and self.save_to_disk:
            kwargs.setdefault(RECORD_KEY, setup_record(self.model, self.cfg))
        super().save(name, **kwargs)

    def load(self, path, checkpointables=None):
        self._resuming_from = path if checkpointables is None else ""
        try:
            return super().load(path, checkpointables=checkpointables)
        finally:
            self._resuming_from = ""

    def _load_model(self, checkpoint):
        if not self._resuming_from:
            return super()._load_model(checkpoint)
        path = self._resuming_from
        saved = checkpoint.get(RECORD_KEY)
        current = setup_record(self.model, self.cfg)
        changes = setup_changes(saved, checkpoint.get("model", {}), current, self.model)
        if changes:
            raise ResumeMismatchError(
                f"cannot --resume from {path}: it was written by another distillation set-up than "
                "this config's:\n  " + "\n  ".join(changes) + "\nResume with the config the run was "
                "started with, or start a new run from these weights (the student's and any matching "
                f"adapters'; optimizer and iteration start afresh): OUTPUT_DIR <a new folder> MODEL.WEIGHTS "
                f"{path}, without --resume"
            )
        changed = value_changes(saved, current)
        if changed:
            logger.warning("Resuming with other distillation values than the checkpoint's run: "
                           + "; ".join(changed))
        incompatible = super()._load_model(checkpoint)
        banks = self.model.prototype_banks() if hasattr(self.model, "prototype_banks") else {
            DEFAULT_TEACHER: getattr(self.model, "prototype_bank", None)}
        for name in [""] + sorted(current.get("teachers") or {}):
            warning = teacher_change(saved, current, name)
            if not warning:
                continue
            bank = banks.get(name or DEFAULT_TEACHER)
            if bank is not None and bank.is_built:
                bank.clear("the checkpoint's prototypes were built with another teacher")
                warning += "; the prototype bank, built with the old teacher, is rebuilt at the next step"
            else:
                warning += "; its adapters were trained against the old one"
            logger.warning(warning)
        return incompatible
