"""Every distillation weight, temperature, period and count is checked when the model is built,
in one place (d2kd/value_checks.py), with one message style (issue 20, item 6)."""
import os
import subprocess
import sys

import pytest
from detectron2.config import CfgNode as CN
from detectron2.modeling import build_model

from conftest import distill_cfg, training_cfg, write_yaml
from d2kd.value_checks import InvalidValueError, problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("heads,key,value,requirement", [
    (["gk"], "GK.FEATURE_WEIGHT", -1.0, "must be >= 0 (0 turns the term off)"),
    (["gk"], "GK.RESPONSE_WEIGHT", -5.0, "must be >= 0 (0 turns the term off)"),
    (["gk"], "GK.GLOBAL_WEIGHT", -1.0, "must be >= 0 (0 turns the term off)"),
    (["gk"], "GK.TEMPERATURE", 0.0, "must be > 0"),
    (["gk"], "PROTOTYPES.PERIOD", -5, "must be >= 0 (0: never rebuild)"),
    (["gk"], "PROTOTYPES.NUM", 0, "must be >= 1 (prototypes per class and stride)"),
    (["fitnet"], "FITNET.WEIGHT", float("nan"), "must be a finite number"),
    (["fitnet"], "SCHEDULE.START_ITER", -1, "must be >= 0"),
    (["kd"], "KD.TEMPERATURE", -2.0, "must be > 0"),
    (["pkd"], "PKD.WEIGHT", -2.0, "must be >= 0, or -1 for the released weight"),
    (["pkd"], "PKD.NUM_LEVELS", -1, "must be >= 0"),
    (["defeat"], "DEFEAT.KL_BG_WEIGHT", -2.0, "must be >= 0 (0 turns the term off)"),
    (["fgfi"], "FGFI.THRESHOLD", 1.5, "must lie in [0, 1]"),
    (["fgfi"], "FGFI.START_ITER", -400, "must be >= 0"),
    (["rkd"], "RKD.ANGLE_WEIGHT", -50.0, "must be >= 0 (0 turns the term off)"),
    (["fitnet"], "FITNET.ADAPTER_KERNEL", 5, "must be 1 or 3"),
])
def test_an_invalid_value_is_refused_at_build_naming_key_value_and_range(tmp_path, heads, key, value, requirement):
    cfg = distill_cfg(tmp_path, heads=heads)
    node, name = key.split(".")
    cfg.DISTILL[node][name] = value
    with pytest.raises(InvalidValueError) as err:
        build_model(cfg)
    assert f"DISTILL.{key} = {value}: {requirement}" in str(err.value)
    assert str(err.value).startswith("invalid distillation value(s); set them in the config file or on the "
                                     "command line:")


def test_every_invalid_value_is_listed_in_one_message_and_valid_edges_build(tmp_path):
    cfg = distill_cfg(tmp_path, heads=["gk", "pkd"])
    cfg.DISTILL.GK.FEATURE_WEIGHT, cfg.DISTILL.GK.RESPONSE_WEIGHT, cfg.DISTILL.PROTOTYPES.PERIOD = -1.0, -5.0, -5
    with pytest.raises(InvalidValueError) as err:
        build_model(cfg)
    lines = str(err.value).splitlines()[1:]
    assert lines == ["  DISTILL.PROTOTYPES.PERIOD = -5: must be >= 0 (0: never rebuild)",
                     "  DISTILL.GK.FEATURE_WEIGHT = -1.0: must be >= 0 (0 turns the term off)",
                     "  DISTILL.GK.RESPONSE_WEIGHT = -5.0: must be >= 0 (0 turns the term off)"]
    # zeros and PKD's -1 (the released weight) are valid
    cfg.DISTILL.GK.FEATURE_WEIGHT, cfg.DISTILL.GK.RESPONSE_WEIGHT, cfg.DISTILL.PROTOTYPES.PERIOD = 0.0, 0.0, 0
    cfg.DISTILL.PKD.WEIGHT = -1.0
    model = build_model(cfg)
    assert model.distill_heads["pkd"].weight == 6.0
    # an invalid value of a head that is not enabled is never read: no error
    cfg.DISTILL.LD.TEMPERATURE = -1.0
    build_model(cfg)


def test_a_head_built_outside_d2kd_gets_the_same_rules_for_its_node():
    cfg = CN()
    cfg.DISTILL = CN()
    cfg.DISTILL.TOY = CN()
    cfg.DISTILL.TOY.MIMIC_WEIGHT, cfg.DISTILL.TOY.TEMPERATURE, cfg.DISTILL.TOY.REFRESH_PERIOD = -1.0, 0.0, -3
    cfg.DISTILL.TOY.ROBUST_WEIGHTS, cfg.DISTILL.TOY.NAME = True, "x"  # a bool, a string: not numbers
    assert problems(cfg, ["DISTILL.TOY"]) == [
        "DISTILL.TOY.MIMIC_WEIGHT = -1.0: must be >= 0 (0 turns the term off)",
        "DISTILL.TOY.TEMPERATURE = 0.0: must be > 0",
        "DISTILL.TOY.REFRESH_PERIOD = -3: must be >= 0",
    ]


def test_train_net_with_a_negative_weight_exits_non_zero_before_training(tmp_path, shapes_cache):
    cfg = training_cfg(tmp_path, heads=["gk"], max_iter=2)
    config_file = write_yaml(cfg, tmp_path / "gk.yaml")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config_file,
         "DISTILL.GK.FEATURE_WEIGHT", "-1.0"],
        cwd=str(tmp_path), env=dict(os.environ, D2KD_CACHE=str(shapes_cache), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "InvalidValueError: invalid distillation value(s)" in log, log[-3000:]
    assert "DISTILL.GK.FEATURE_WEIGHT = -1.0: must be >= 0 (0 turns the term off)" in log
    assert "Starting training" not in log
    assert not [f for f in os.listdir(cfg.OUTPUT_DIR) if f.endswith(".pth")]
