"""A user's own data: teacher paths inherited through ``_BASE_``, the prototype period in
epochs, and the pre-flight report of tools/inspect_dataset.py."""
import os

import pytest

from d2kd.config import load_config, resolve_teacher_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "configs", "shapes")


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_a_shipped_distillation_config_inherited_from_another_folder_resolves_its_teacher(tmp_path, monkeypatch):
    """The user's config lives elsewhere and inherits a shipped GK config by absolute path: the
    shipped file's relative teacher path is resolved beside the shipped file."""
    monkeypatch.chdir(tmp_path)
    mine = _write(tmp_path / "mine" / "my_gk.yaml", (
        f'_BASE_: "{os.path.join(SHAPES, "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml")}"\n'
        "SOLVER:\n  IMS_PER_BATCH: 2\n"))
    cfg = load_config(mine)
    expected = os.path.join(SHAPES, "faster_rcnn_R_18_FPN_1k_shapes.yaml")
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == expected
    assert resolve_teacher_config_file(cfg.DISTILL.TEACHER.CONFIG_FILE) == expected
    from d2kd.modeling.teacher import build_teacher_cfg

    assert build_teacher_cfg(cfg).MODEL.FPN.OUT_CHANNELS == 64  # the shipped teacher's config


def test_each_level_of_base_resolves_the_teacher_it_writes_and_an_override_wins(tmp_path, monkeypatch):
    """top.yaml -> mid/mid.yaml -> <shipped gk config>: the value written lowest in the chain
    (nearest the top) wins and is resolved beside the file that wrote it; opts stay as typed."""
    monkeypatch.chdir(tmp_path)
    gk = os.path.join(SHAPES, "gk_faster_rcnn_R_18_half_FPN_1k_shapes.yaml")
    teacher_text = f'_BASE_: "{os.path.join(SHAPES, "faster_rcnn_R_18_FPN_1k_shapes.yaml")}"\n'
    _write(tmp_path / "mid" / "teachers" / "t.yaml", teacher_text)
    _write(tmp_path / "top" / "teachers" / "t.yaml", teacher_text)  # same name, other folder
    mid = _write(tmp_path / "mid" / "mid.yaml", f'_BASE_: "{gk}"\nDISTILL:\n  TEACHER:\n    CONFIG_FILE: "teachers/t.yaml"\n')
    # inherits mid's teacher: resolved beside mid.yaml, not beside top.yaml (which has a t.yaml too)
    top = _write(tmp_path / "top" / "top.yaml", '_BASE_: "../mid/mid.yaml"\nSEED: 3\n')
    assert load_config(top).DISTILL.TEACHER.CONFIG_FILE == str(tmp_path / "mid" / "teachers" / "t.yaml")
    # a file nearer the top overrides: its own folder counts
    over = _write(tmp_path / "top" / "over.yaml", '_BASE_: "../mid/mid.yaml"\nDISTILL:\n  TEACHER:\n    CONFIG_FILE: "teachers/t.yaml"\n')
    assert load_config(over).DISTILL.TEACHER.CONFIG_FILE == str(tmp_path / "top" / "teachers" / "t.yaml")
    # a list of bases: the later one wins, as fvcore merges them
    listed = _write(tmp_path / "top" / "listed.yaml", f'_BASE_: ["{gk}", "../mid/mid.yaml"]\n')
    assert load_config(listed).DISTILL.TEACHER.CONFIG_FILE == str(tmp_path / "mid" / "teachers" / "t.yaml")
    # the command line is taken as typed (the working directory's, when the teacher is built)
    typed = load_config(top, ["DISTILL.TEACHER.CONFIG_FILE", "teachers/t.yaml"])
    assert typed.DISTILL.TEACHER.CONFIG_FILE == "teachers/t.yaml"
    # a model-zoo name stays a name
    zoo = _write(tmp_path / "top" / "zoo.yaml", f'_BASE_: "{gk}"\nDISTILL:\n  TEACHER:\n    CONFIG_FILE: "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"\n')
    assert load_config(zoo).DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
