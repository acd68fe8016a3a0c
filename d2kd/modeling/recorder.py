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

    def __init__(self, recorder: "Recorder", key: str, append: bool = False):
        self.recorder, self.key, self.append = recorder, key, append

    def __call__(self, module, inputs, output):
        if self.recorder._active:
            if self.append:  # a module called once per level: keep every call, in order
                self.recorder.values.setdefault(self.key, []).append(output)
            else:
                self.recorder.values[self.key] = output


class Recorder:
    """Forward hooks on named submodules that keep their outputs while recording is on.

    Outside :meth:`recording` the hooks do nothing, so inference, evaluation and prototype
    extraction are unaffected. A path that the model lacks is skipped (the detector kind's
    capability check reports what a head cannot have).
    """

    def __init__(self, model: nn.Module, paths: Dict[str, str], appending: Dict[str, str] = None):
        """``paths``: key -> submodule path, its last output kept; ``appending``: key -> path of
        a submodule called several times per forward (e.g. a head's tower, once per level),
        the list of its outputs kept."""
        self._active = False
        self.values: Dict[str, Any] = {}
        self._handles = []
        hooks = [(k, p, False) for k, p in paths.items()] + [(k, p, True) for k, p in (appending or {}).items()]
        for key, path, append in hooks:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            self._handles.append(module.register_forward_hook(_RecordHook(self, key, append)))

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
