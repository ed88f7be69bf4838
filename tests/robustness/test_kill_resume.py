"""``kill -9`` of a real training (the tiny Co-Deformable-DETR, K = 2: ATSS + Faster R-CNN with their random
samplers, customized positive queries) at a (seeded) random iteration after its first checkpoint, then
``--resume auto``:
the final weights equal an uninterrupted run's bit for bit (CPU, seeded, same thread count)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codetr.engine.checkpoint import extract_state_dict, load_checkpoint

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tests" / "tiny.yaml"
ITERS = 8
pytestmark = pytest.mark.slow


def _command(synth, out: Path, *extra: str) -> list[str]:
    tr, va = synth["train"], synth["val"]
    sets = [
        f"data.train.coco.ann_file={tr.ann_file}", f"data.train.coco.images_dir={tr.images_dir}",
        f"data.val.coco.ann_file={va.ann_file}", f"data.val.coco.images_dir={va.images_dir}",
        "data.train.batch_size=2", "data.val.batch_size=2",
        f"schedule.iterations={ITERS}", "schedule.milestones=[6]", "runtime.checkpoint_period=2",
        "runtime.keep_last=10", "runtime.log_period=1", "runtime.seed=5", "model.num_classes=6",
        "model.aux_heads=[{type: faster_rcnn, fc_out_channels: 32, feat_channels: 32}, "
        "{type: atss, feat_channels: 32, assigner: {type: atss, topk: 3}}]",
        "model.query_encoder={type: positive_queries, head_pos_embed: vector, min_pos_queries: 2, max_pos_queries: 8}",
    ]
    cmd = [sys.executable, "-m", "codetr.cli.main", "train", str(TINY), "--output-dir", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd + list(extra)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _last_iteration(run: Path) -> int:
    """Highest ``iteration`` among the complete ``metrics.jsonl`` lines written so far (0 before any)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    its = []
    for line in lines:
        try:
            its.append(int(json.loads(line).get("iteration", 0)))
        except (ValueError, TypeError):  # a line being written
            continue
    return max(its, default=0)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return extract_state_dict(load_checkpoint(out / "checkpoints" / "model_final.pt"))


def test_kill_9_then_resume_auto_is_bit_identical(synth_data, tmp_path):
    full = tmp_path / "full"
    subprocess.run(_command(synth_data, full), env=_env(), check=True, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_command(synth_data, run), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    kill_at = random.Random(0).randint(3, ITERS - 2)  # an iteration after the first checkpoint (at 2)
    deadline = time.monotonic() + 300
    try:
        while _last_iteration(run) < kill_at:
            assert proc.poll() is None, f"the run ended before iteration {kill_at}"
            assert time.monotonic() < deadline, f"iteration {kill_at} not reached within 300 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "model_final.pt").exists(), "killed too late: the run had finished"

    resumed = subprocess.run(_command(synth_data, run, "--resume", "auto"), env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    want, got = _final(full), _final(run)
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ after kill -9 + resume, e.g. {differ[:5]}"
