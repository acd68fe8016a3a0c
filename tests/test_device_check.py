"""benchmarks/device_check.sh on a machine without a GPU: its plan, its argument handling, its
clear refusal, and the finiteness check of the AMP runs (the check itself needs CUDA)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "device_check.sh")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import device_check  # noqa: E402


def _run(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHON=sys.executable, **(env or {})), timeout=120)


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    for name in ("cuda-tests", "amp-gk", "amp-kd", "amp-ld", "amp-crosskd", "amp-gk-online", "step-time", "pgm",
                 "refresh-coco", "inference"):
        assert f"  {name} (limit" in proc.stdout, name
    assert "bench_step_time.py --device cuda" in proc.stdout
    assert "SOLVER.AMP.ENABLED True" in proc.stdout and "MODEL.DEVICE cuda" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_without_cuda_it_stops_at_once_and_says_so(tmp_path):
    proc = _run("--out", str(tmp_path / "out"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "nothing was checked" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused_with_the_step_names():
    proc = _run("--dry-run", "--only", "amp-gk", "warp-drive")
    assert proc.returncode == 2 and "unknown step(s) ['warp-drive']" in proc.stderr
    assert "amp-kd" in proc.stderr  # the names it knows
    proc = _run("--dry-run", "--budget-s", "0")
    assert proc.returncode == 2 and "--budget-s must be > 0" in proc.stderr
    proc = _run("--dry-run", "--only", "pgm")
    assert proc.returncode == 0 and "  pgm (limit" in proc.stdout and "amp-gk" not in proc.stdout


def test_the_amp_runs_must_log_finite_losses(tmp_path):
    metrics = tmp_path / "metrics.json"
    assert "no " in device_check._finite_losses("", str(tmp_path))
    metrics.write_text(json.dumps({"iteration": 19, "total_loss": 2.5, "loss_distill_gk_fg": 0.1}) + "\n")
    assert device_check._finite_losses("", str(tmp_path)) is None
    with metrics.open("a") as f:
        f.write(json.dumps({"iteration": 39, "total_loss": float("nan")}) + "\n")
    assert "total_loss = nan at iteration 39" in device_check._finite_losses("", str(tmp_path))
    assert device_check._no_skips("1 passed, 1 skipped", "") is not None
    assert device_check._no_skips("2 passed", "") is None
