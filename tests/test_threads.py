"""The CPU thread policy (d2kd.utils.threads.cpu_threads): --threads, else OMP_NUM_THREADS,
else every core, split among the stages the demo runs side by side."""
import json
import os
import runpy
import sys
from concurrent.futures import Future

import pytest
import torch

from d2kd.engine import experiment
from d2kd.utils import threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def machine(monkeypatch):
    """A machine of ``cores`` cores, OMP_NUM_THREADS unset; torch's threads restored after."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored after, even once exported

    def cores(n):
        monkeypatch.setattr(threads, "_available_cores", lambda: n, raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: n)  # what the code before the policy read

    cores(2)
    yield cores
    torch.set_num_threads(before)


def test_the_thread_budget_is_the_flag_else_omp_num_threads_else_every_core(machine, monkeypatch):
    assert threads.cpu_threads() == 2
    assert threads.cpu_threads(side_by_side=2) == 1 and threads.cpu_threads(side_by_side=3) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.cpu_threads() == 1
    assert threads.cpu_threads(4) == 4 and threads.cpu_threads(4, side_by_side=2) == 2  # the flag wins
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")  # OpenMP's nested form: the outer level
    assert threads.cpu_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ValueError, match=r"OMP_NUM_THREADS='two' is not a number of threads >= 1"):
        threads.cpu_threads()
    with pytest.raises(ValueError, match=r"--threads -1"):
        threads.cpu_threads(-1)


class _RecordingPool:
    """Stands in for ProcessPoolExecutor: records the processes and the threads each stage
    gets, and writes the stage's results as a finished worker would."""
    made = []

    def __init__(self, workers, **kwargs):
        self.workers, self.submitted = workers, []
        _RecordingPool.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, name, config, out, opts, threads):
        self.submitted.append((name, threads))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, experiment.RESULTS_FILE), "w") as f:
            json.dump({"AP": 1.0, "AP50": 1.0, "AP75": 1.0}, f)
        done = Future()
        done.set_result(None)
        return done


class _Stop(Exception):
    pass


def _demo_stages(tmp_path, monkeypatch, argv):
    """Run tools/demo.py's main with ``argv`` up to its distillation stage; return (processes
    side by side, threads per stage, this process's threads when it trains a stage itself)."""
    _RecordingPool.made = []
    inline = []

    def train_here(config, out, opts=()):
        inline.append(torch.get_num_threads())
        if "teacher_seed" in out or "student_seed" in out:
            return {"AP": 1.0}
        raise _Stop  # the distillation stage: far enough

    monkeypatch.setattr(experiment, "ProcessPoolExecutor", _RecordingPool)
    monkeypatch.setattr(experiment, "train_and_evaluate", train_here)
    demo = runpy.run_path(os.path.join(REPO, "tools", "demo.py"), run_name="d2kd_demo_under_test")
    monkeypatch.setattr(sys, "argv", ["demo.py", "--output-dir", str(tmp_path / "demo"), *argv])
    with pytest.raises(_Stop):
        demo["main"]()
    pools = _RecordingPool.made
    side_by_side = pools[0].workers if pools else 1
    per_stage = [t for _, t in pools[0].submitted] if pools else inline[:2]
    return side_by_side, per_stage, inline[-1]


def test_the_demos_stages_split_the_cores_by_default(machine, tmp_path, monkeypatch):
    side_by_side, per_stage, distill = _demo_stages(tmp_path, monkeypatch, [])
    assert (side_by_side, per_stage, distill) == (2, [1, 1], 2)  # as before: teacher | student, then 2 threads


def test_the_demo_respects_omp_num_threads(machine, tmp_path, monkeypatch):
    machine(8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one core free on a busy 8-core machine
    side_by_side, per_stage, distill = _demo_stages(tmp_path, monkeypatch, [])
    assert (side_by_side, per_stage, distill) == (1, [1, 1], 1)  # one stage at a time, one thread


def test_the_demos_threads_flag_is_split_among_its_stages_and_wins_over_omp(machine, tmp_path, monkeypatch):
    machine(8)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    side_by_side, per_stage, distill = _demo_stages(tmp_path, monkeypatch, ["--threads", "4"])
    assert (side_by_side, per_stage, distill) == (2, [2, 2], 4)
    assert os.environ["OMP_NUM_THREADS"] == "4"  # what a process started from the demo sees
