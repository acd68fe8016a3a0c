"""The README's "Writing a distillation head" example works as written."""
import os
import re

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import distill_cfg, random_batch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _example_code() -> str:
    text = open(README).read()
    section = text[text.index("### Writing a distillation head"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_head_is_short_and_trains_a_step(tmp_path):
    code = _example_code()
    assert len(code.strip().splitlines()) < 40
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    cfg = distill_cfg(tmp_path, "retinanet", "retinanet", heads=["confidentanchors"])
    model = build_model(cfg)
    model.train()
    namespace["ConfidentAnchorsHead"].threshold = 0.0  # a random teacher is confident nowhere
    with EventStorage(0):
        losses = model(random_batch())
    assert losses["loss_distill_confidentanchors"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    (tmp_path / "rcnn").mkdir()
    with pytest.raises(ValueError, match="'confidentanchors' requires 'student.dense'"):
        build_model(distill_cfg(tmp_path / "rcnn", "rcnn", "rcnn", heads=["confidentanchors"]))
