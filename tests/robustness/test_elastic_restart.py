"""Elastic restart under torchrun: 2 CPU ranks (gloo) train the real tiny K = 2 Co-Deformable-DETR; on the first
attempt rank 1 is killed with SIGKILL after step 5; torchrun (``--max-restarts 1``) restarts both ranks, which
``--resume auto`` from the step-4 checkpoint, replay step 5 and finish. The final weights equal those of an uninterrupted
2-rank run bit for bit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codetr.engine.checkpoint import extract_state_dict, load_checkpoint
from tests.robustness.test_kill_resume import _command

WORKER = Path(__file__).resolve().parent / "_elastic_worker.py"
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(synth, out: Path, kill: bool) -> subprocess.CompletedProcess:
    train = _command(synth, out, "--resume", "auto")
    args = train[train.index("train"):]  # drop "python -m codetr.cli.main"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_port()}",
           str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CODETR_TEST_KILL_RANK": "1" if kill else "-1", "CODETR_TEST_KILL_AT": "5"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_killed_rank_restarts_from_the_last_checkpoint_and_finishes(synth_data, tmp_path):
    full = _torchrun(synth_data, tmp_path / "full", kill=False)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    run = tmp_path / "killed"
    res = _torchrun(synth_data, run, kill=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "exitcode: -9" in log, log[-3000:]  # the first attempt lost rank 1 to SIGKILL, torchrun restarted
    # the restarted ranks resumed from the step-4 checkpoint (periodic, every 2; epochs end at 3 and 6) and replayed 5
    assert "iter_00000004.pt: iteration 4/8" in log, log[-3000:]
    want = extract_state_dict(load_checkpoint(tmp_path / "full" / "checkpoints" / "model_final.pt"))
    got = extract_state_dict(load_checkpoint(run / "checkpoints" / "model_final.pt"))
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ after the elastic restart, e.g. {differ[:5]}"
