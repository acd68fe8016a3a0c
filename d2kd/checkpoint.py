"""A DetectionCheckpointer whose saves are atomic and whose load errors name the file."""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils.atomic import atomic_write


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """Writes each checkpoint (and ``last_checkpoint``) to a temporary file, then renames it.

    fvcore writes in place, so a crash or kill mid-save leaves a truncated ``model_*.pth``
    that ``last_checkpoint`` may already name; ``--resume`` then fails. ``os.replace`` is atomic
    on POSIX, so a reader sees either the old file or the complete new one.

    The teacher is never saved: it is not in the distillation model's module tree.
    """

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

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except Exception as e:
            raise RuntimeError(
                f"could not read checkpoint '{filename}' ({type(e).__name__}: {e}). The file is "
                "corrupt or not a checkpoint; to resume from an earlier one, write its file name "
                f"into {os.path.join(self.save_dir or '<OUTPUT_DIR>', 'last_checkpoint')}"
            ) from e


class IncompatibleCheckpointError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


class StrictDetectionCheckpointer(AtomicDetectionCheckpointer):
    """Loads like DetectionCheckpointer, but any missing, unexpected or mis-shaped key raises.

    detectron2 only logs these, which is right for fine-tuning and wrong for a teacher: a
    teacher with randomly initialised layers distils noise.
    """

    def _log_incompatible_keys(self, incompatible) -> None:
        problems = []
        if incompatible.missing_keys:
            problems.append("missing: " + ", ".join(sorted(incompatible.missing_keys)))
        if incompatible.unexpected_keys:
            problems.append("unexpected: " + ", ".join(sorted(incompatible.unexpected_keys)))
        if incompatible.incorrect_shapes:
            problems.append(
                "wrong shape: "
                + ", ".join(f"{k} (file {a}, model {b})" for k, a, b in incompatible.incorrect_shapes)
            )
        if problems:
            raise IncompatibleCheckpointError("; ".join(problems))
