"""Record what submodules return during a model's own forward, with forward hooks.

This is how the student's intermediate results reach the distillation heads without copying
detectron2's forward passes (d2go's distillation records layers the same way).
"""
from contextlib import contextmanager
from typing import Any, Dict

from torch import nn


class _RecordHook:
    """A forward hook that keeps a submodule's output in its recorder.

    An object rather than a closure: ``copy.deepcopy`` of the model copies it with the model's
    recorder (one memo), so a copy (e.g. an EMA model) records into its own recorder, not the
    original's.
    """

    def __init__(self, recorder: "Recorder", key: str):
        self.recorder, self.key = recorder, key

    def __call__(self, module, inputs, output):
        if self.recorder._active:
            self.recorder.values[self.key] = output


class Recorder:
    """Forward hooks on named submodules that keep their outputs while recording is on.

    Outside :meth:`recording` the hooks do nothing, so inference, evaluation and prototype
    extraction are unaffected. A path that the model lacks is skipped (the detector kind's
    capability check reports what a head cannot have).
    """

    def __init__(self, model: nn.Module, paths: Dict[str, str]):
        self._active = False
        self.values: Dict[str, Any] = {}
        self._handles = []
        for key, path in paths.items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            self._handles.append(module.register_forward_hook(_RecordHook(self, key)))

    def put(self, key: str, value: Any) -> None:
        """Record a value from code (an overridden method) rather than a hook."""
        if self._active:
            self.values[key] = value

    @contextmanager
    def recording(self):
        """Record into a fresh dict, returned; the recorder lets go of it on exit."""
        values = self.values = {}
        self._active = True
        try:
            yield values
        finally:
            self._active = False
            self.values = {}
