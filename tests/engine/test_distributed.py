"""Launcher environment parsing, device resolution and DDP error messages (no process group needed)."""

from __future__ import annotations

import datetime

import pytest
import torch
from torch import nn

from codetr.engine import distributed as du


def test_single_process_without_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    info = du.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend) == (0, 1, None) and info.device == torch.device("cpu")
    assert du.get_rank() == 0 and du.get_world_size() == 1 and du.is_main()
    assert du.all_gather_object({"a": 1}) == [{"a": 1}] and du.broadcast_object(3) == 3
    assert du.all_reduce_mean({"x": 2.0}) == {"x": 2.0}
    du.barrier()


def test_launcher_errors_are_explained(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    with pytest.raises(du.DistributedError, match="RANK is not"):
        du.init_distributed("cpu")
    # Slurm variables are understood; MASTER_ADDR must come from the batch script
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(du.DistributedError, match="scontrol show hostnames"):
        du.init_distributed("cpu")


def test_resolve_device_and_timeout(monkeypatch):
    assert du.resolve_device("cpu") == torch.device("cpu")
    assert du.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(du.DistributedError, match="CUDA is not available"):
            du.resolve_device("cuda:0")
    with pytest.raises(du.DistributedError, match="not understood"):
        du.resolve_device("tpu")
    monkeypatch.setenv("CODETR_DIST_TIMEOUT_MIN", "5")
    assert du.dist_timeout() == datetime.timedelta(minutes=5)
    monkeypatch.delenv("CODETR_DIST_TIMEOUT_MIN")
    assert du.dist_timeout() == datetime.timedelta(minutes=30)


def test_ddp_unused_parameter_error_names_them():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)  # frozen parameters are not in DDP's index space
    msg = ("Expected to have finished reduction in the prior iteration before starting a new one. ... "
           "Parameter indices which did not receive grad for rank 1: 1")
    err = du.explain_ddp_error(RuntimeError(msg), model)
    assert isinstance(err, du.UnusedParametersError)
    assert "1.bias" in str(err) and "zero-weight loss" in str(err)
    assert du.explain_ddp_error(RuntimeError("CUDA out of memory"), model) is None


def test_failed_launch_leaves_the_environment_alone(monkeypatch):
    import os

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(du.DistributedError):
        du.init_distributed("cpu")
    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ
