"""The multi-machine route (issue 20, item 8): train_net.py started once per machine with
--num-machines 2 --machine-rank 0|1 --dist-url tcp://..., here as two processes on one CPU host
(gloo). Both machines end GK's prototype build with the identical bank, and when one machine is
lost, the other exits non-zero within seconds instead of hanging."""
import os
import signal
import socket
import subprocess
import sys
import time

import torch

from conftest import training_cfg, write_yaml

LAUNCHER = '''
import os, time
import torch
from d2kd.engine import DistillTrainer

run_step = DistillTrainer.run_step


def run_step_then_lose_machine_1(self):  # top level: the spawned worker runs it too
    from detectron2.utils import comm

    if self.iter == 1:  # the bank was built before iteration 0
        bank = self.model.module.prototype_bank
        torch.save(bank.state_dict(), os.path.join(os.environ["BANKS"], f"bank_rank{comm.get_rank()}.pth"))
    if comm.get_rank() == 1 and self.iter == 2:  # machine 1 goes down: its launcher, then its worker
        with open(os.environ["KILLED_AT"], "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getppid(), 9)
        os.kill(os.getpid(), 9)
    return run_step(self)


DistillTrainer.run_step = run_step_then_lose_machine_1
from d2kd.train_net import invoke_main

if __name__ == "__main__":
    invoke_main()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_build_identical_banks_and_losing_one_ends_the_other_fast(tmp_path, shapes_cache):
    cfg = training_cfg(tmp_path, heads=["gk"], max_iter=50)
    cfg.SOLVER.IMS_PER_BATCH = 4  # 2 per machine
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.DISTILL.GK.FEATURE_WEIGHT = 1e-6
    p = cfg.DISTILL.PROTOTYPES
    p.MAX_IMAGES, p.MIN_SIZE, p.NUM, p.START_ITER, p.PERIOD = 4, 4, 3, 0, 0
    config_file = write_yaml(cfg, tmp_path / "gk.yaml")
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    killed_at = tmp_path / "killed_at"
    env = dict(os.environ, D2KD_CACHE=str(shapes_cache), OMP_NUM_THREADS="1", BANKS=str(tmp_path),
               KILLED_AT=str(killed_at))
    url = f"tcp://127.0.0.1:{free_port()}"
    machines = []
    try:
        for rank in (0, 1):
            # each machine its own OUTPUT_DIR, as on separate disks
            out = str(tmp_path / f"machine{rank}")
            machines.append(subprocess.Popen(
                [sys.executable, str(launcher), "--config-file", config_file, "--num-machines", "2",
                 "--machine-rank", str(rank), "--dist-url", url, "OUTPUT_DIR", out, "MODEL.DEVICE", "cpu"],
                cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            ))
        logs = [m.communicate(timeout=300)[0] for m in machines]
        ended = time.time()
    finally:
        for m in machines:
            if m.poll() is None:
                os.killpg(m.pid, signal.SIGKILL)
    assert killed_at.exists(), logs[0][-3000:] + logs[1][-3000:]
    assert machines[1].returncode == -signal.SIGKILL
    assert machines[0].returncode != 0
    assert ended - float(killed_at.read_text()) < 20, logs[0][-2000:]
    assert "Starting training from iteration 0" in logs[0]
    assert "Prototype build at iteration 0" in logs[0]
    a, b = torch.load(tmp_path / "bank_rank0.pth"), torch.load(tmp_path / "bank_rank1.pth")
    assert a["num_builds"].item() == 1 and a["valid_s8"].any()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not os.path.exists(tmp_path / "machine0" / "model_final.pth")
