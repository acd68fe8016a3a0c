"""DetectionCheckpointers whose saves are atomic, whose loads are safe (``weights_only=True``,
no unpickling of untrusted ``.pkl`` files), and whose errors are short and name the file."""
import os
from typing import List, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils.atomic import atomic_write

# Where detectron2 and Detectron publish their pickled (.pkl) models: loaded as they always were.
TRUSTED_PICKLE_PREFIXES = (
    "detectron2://",
    "catalog://",
    "https://dl.fbaipublicfiles.com/detectron2/",
    "https://dl.fbaipublicfiles.com/detectron/",
)
ALLOW_PICKLE_KEY = "DISTILL.TEACHER.ALLOW_PICKLE"
# State of a d2kd training checkpoint that no plain detector has.
DISTILL_STATE_PREFIXES = ("distill_heads.", "prototype_bank.", "extra_prototype_banks.")


class CheckpointReadError(RuntimeError):
    """A checkpoint file cannot be read (corrupt, truncated, not a checkpoint, or holding
    objects other than tensors and plain containers)."""


class UntrustedPickleError(ValueError):
    """A ``.pkl`` file from a path d2kd does not trust, and unpickling was not allowed."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into.

    The message is a summary (counts, the first few keys of each kind, the likely cause);
    the full lists are in ``missing``, ``unexpected`` and ``wrong_shape``.
    """

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str],
                 wrong_shape: Sequence[Tuple[str, tuple, tuple]], shown: int = 3):
        self.wrong_shape = list(wrong_shape)
        mis_shaped = {k for k, _, _ in self.wrong_shape}  # fvcore drops them: they also come as missing
        self.missing = [k for k in missing if k not in mis_shaped]
        self.unexpected = list(unexpected)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: " + _first(sorted(self.missing), shown))
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: " + _first(sorted(self.unexpected), shown))
        if self.wrong_shape:
            parts.append(f"{len(self.wrong_shape)} wrong shape: " + _first(
                [f"{k} (file {tuple(a)}, model {tuple(b)})" for k, a, b in self.wrong_shape], shown))
        message = "; ".join(parts)
        cause = self.likely_cause()
        super().__init__(f"{message}. Likely cause: {cause}" if cause else message)

    def likely_cause(self) -> str:
        if any(k.startswith(DISTILL_STATE_PREFIXES) for k in self.unexpected):
            return ("this looks like a d2kd training checkpoint of a distilled student (it holds "
                    "distillation adapters or prototypes), not a plain detector's")
        if self.wrong_shape and not self.missing and not self.unexpected:
            return "the checkpoint is of the same architecture at another width or class count"
        if self.missing and self.unexpected:
            return "the checkpoint is of another architecture than the config describes"
        return ""


def _first(items: List[str], shown: int) -> str:
    text = ", ".join(items[:shown])
    return text + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")


# Phrases of torch's weights_only error text that are advice, not diagnosis.
_TORCH_ADVICE = ("weights_only", "trust", "Weights only load failed", "Check the documentation",
                 "Please file an issue", "safe_globals")


def describe_load_error(e: BaseException) -> str:
    """What went wrong reading a checkpoint, in one short clause.

    torch's own messages run to many lines and advise ``weights_only=False`` -- advice that
    must never be passed on for a file nobody vouched for. This keeps the diagnosis only.
    """
    text = str(e)
    if "Weights only load failed" in text:
        kept = []
        for line in text.splitlines():
            line = line.strip().split("WeightsUnpickler error:")[-1].strip()
            line = line.split(". Please use")[0].strip().rstrip(".")
            if line and not any(w in line for w in _TORCH_ADVICE):
                kept.append(line)
        detail = "; ".join(kept) or "objects other than tensors"
        return (f"it is not a plain checkpoint of tensors ({detail}); d2kd loads checkpoints with "
                "weights_only=True and never unpickles arbitrary objects")
    first = text.strip().split("\n")[0]
    for cut in (". This is an internal", ". If you are seeing"):
        first = first.split(cut)[0]
    return f"{type(e).__name__}: {first.rstrip('.')}"


def is_trusted_pickle(path: str) -> bool:
    return str(path).startswith(TRUSTED_PICKLE_PREFIXES)


def check_pickle_allowed(path: str, allow_pickle: bool, key: str = "the checkpoint",
                         allow_key: str = ALLOW_PICKLE_KEY) -> None:
    """Refuse to unpickle a ``.pkl`` from anywhere but detectron2's model zoo unless allowed."""
    plain = str(path).split("?")[0]
    if plain.endswith(".pkl") and not allow_pickle and not is_trusted_pickle(plain):
        raise UntrustedPickleError(
            f"refusing to load {key} '{path}': a .pkl file is unpickled, and unpickling a file can "
            "run any code in it. d2kd unpickles only detectron2's model zoo (detectron2://, "
            "https://dl.fbaipublicfiles.com/detectron2/). Convert the file to a .pth of tensors "
            f"(torch.save({{'model': state_dict}})), or, if you trust it, set {allow_key} True"
        )


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer that saves atomically and loads safely.

    Saves: each checkpoint (and ``last_checkpoint``) is written to a temporary file, then
    renamed. fvcore writes in place, so a crash or kill mid-save leaves a truncated
    ``model_*.pth`` that ``last_checkpoint`` may already name; ``--resume`` then fails.
    ``os.replace`` is atomic on POSIX, so a reader sees either the old file or the complete
    new one. The teacher is never saved: it is not in the distillation model's module tree.

    Loads: ``.pth`` files with ``torch.load(weights_only=True)``; a ``.pkl`` (which detectron2
    unpickles) only from detectron2's model zoo unless ``allow_pickle``. An unreadable file
    raises :class:`CheckpointReadError` naming it; on ``--resume`` the message also says how
    to fall back to an earlier checkpoint.
    """

    def __init__(self, model, save_dir="", *, allow_pickle: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_pickle = allow_pickle

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, last_filename_basename)

    def load(self, path, *args, **kwargs):
        if path:
            check_pickle_allowed(path, self.allow_pickle)
        return super().load(path, *args, **kwargs)

    def resume_or_load(self, path: str, *, resume: bool = True):
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        self._check_last_checkpoint()
        try:
            return super().resume_or_load(path, resume=resume)
        except CheckpointReadError as e:
            raise CheckpointReadError(
                f"{e}. To resume from an earlier checkpoint, write its file name into "
                f"{os.path.join(self.save_dir, 'last_checkpoint')}"
            ) from None

    def _check_last_checkpoint(self) -> None:
        """``last_checkpoint`` must name a file that exists (fvcore asserts it, bare)."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        named = self.get_checkpoint_file()
        if named and os.path.isfile(named):
            return
        try:
            with open(tag) as f:
                content = f.read().strip()
        except OSError:  # removed meanwhile: fvcore then starts from MODEL.WEIGHTS
            return
        problem = (f"{tag} is empty" if not content
                   else f"{tag} names {content!r}, which does not exist in {self.save_dir}")
        present = sorted(f for f in os.listdir(self.save_dir) if f.startswith("model_") and f.endswith(".pth"))
        fix = (f"write the file name of one of its checkpoints into it ({', '.join(present[-3:])})" if present
               else "there is no checkpoint to resume from: delete it (or run without --resume) to "
               "start afresh")
        raise CheckpointReadError(f"cannot resume: {problem}. To resume, {fix}")

    def _torch_load(self, f):
        # DetectionCheckpointer's hook for everything but .pkl / .pyth
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except Exception as e:
            # ``from None``: a chained traceback would print torch's own text, which advises
            # weights_only=False (running the file's code). It stays reachable as __context__.
            raise CheckpointReadError(
                f"could not read checkpoint '{filename}': {describe_load_error(e)}. The file is "
                "corrupt, truncated, or not a checkpoint"
            ) from None


class StrictDetectionCheckpointer(AtomicDetectionCheckpointer):
    """Loads like DetectionCheckpointer, but any missing, unexpected or mis-shaped key raises
    :class:`IncompatibleCheckpointError` (a summary, not every key).

    detectron2 only logs these, which is right for fine-tuning and wrong for a teacher: a
    teacher with randomly initialised layers distils noise.
    """

    def _log_incompatible_keys(self, incompatible) -> None:
        if incompatible.missing_keys or incompatible.unexpected_keys or incompatible.incorrect_shapes:
            raise IncompatibleCheckpointError(
                incompatible.missing_keys, incompatible.unexpected_keys, incompatible.incorrect_shapes
            )
