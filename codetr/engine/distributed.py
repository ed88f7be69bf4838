"""Process groups, devices and DDP wrapping.

Launchers (the same YAML works under each):

* ``torchrun --nproc-per-node N codetr train ...`` (single or multi node; env ``RANK``/``WORLD_SIZE``/
  ``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``);
* Slurm ``srun codetr train ...``: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` are used when
  ``RANK`` is not set; ``MASTER_ADDR`` must be exported by the batch script (the first host of the
  allocation: ``export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)``) and
  ``MASTER_PORT`` defaults to 29500;
* plain ``python``: one process, no process group.

Backend: ``nccl`` when the resolved device is CUDA, ``gloo`` on CPU (and MPS).

Timeouts: collectives time out after ``CODETR_DIST_TIMEOUT_MIN`` minutes (default 30). Evaluation runs
on every rank (per-rank inference, then a gather), so no rank waits in a collective while another
works alone for long; the one exception is the COCO summary computed on the main rank after the gather
(seconds to a couple of minutes on COCO val with faster-coco-eval), well within the default. Raise the
timeout for very large validation sets or slow shared filesystems (checkpoint writes on rank 0 happen
outside collectives). A timeout then aborts the job instead of hanging forever; the usual causes are
ranks running different numbers of batches (uneven data shards), a rank that crashed, or an exception
on one rank only — the log of the *other* ranks says which rank stopped first.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from codetr.core.dist import get_rank, get_world_size, is_distributed

__all__ = [
    "DistInfo",
    "DistributedError",
    "UnusedParametersError",
    "init_distributed",
    "destroy_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main",
    "barrier",
    "all_reduce_mean",
    "all_reduce_max",
    "all_gather_object",
    "broadcast_object",
    "resolve_device",
    "wrap_ddp",
    "dist_timeout",
    "unused_parameter_names",
    "explain_ddp_error",
]

DEFAULT_TIMEOUT_MIN = 30.0


class DistributedError(RuntimeError):
    """A launch / process-group problem, with the fix in the message."""


class UnusedParametersError(DistributedError):
    """Some trainable parameters got no gradient, which DDP (``find_unused_parameters=False``) cannot handle."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group


# --------------------------------------------------------------------------- queries
def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))) if is_distributed() else 0


def is_main() -> bool:
    return get_rank() == 0


def dist_timeout() -> _dt.timedelta:
    """Collective timeout: ``CODETR_DIST_TIMEOUT_MIN`` minutes (default 30)."""
    raw = os.environ.get("CODETR_DIST_TIMEOUT_MIN", "")
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MIN
    except ValueError:
        raise DistributedError(f"CODETR_DIST_TIMEOUT_MIN={raw!r} is not a number of minutes") from None
    return _dt.timedelta(minutes=minutes)


# --------------------------------------------------------------------------- device
def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` -> ``cuda:<local rank>`` when CUDA is available, else ``cpu``; ``cuda`` -> ``cuda:<local rank>``.

    ``cuda:N`` is honoured as given (single-process use). Raises a clear error when CUDA is requested but
    unavailable.
    """
    spec = (spec or "auto").strip().lower()
    lr = get_local_rank() if local_rank is None else local_rank
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", lr % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError(f"runtime.device={spec!r} but CUDA is not available on this machine "
                                   "(fix: use runtime.device=auto or cpu)")
        if spec == "cuda":
            return torch.device("cuda", lr % torch.cuda.device_count())
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DistributedError(f"runtime.device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    if spec == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DistributedError("runtime.device='mps' but MPS is not available (fix: runtime.device=cpu)")
        return torch.device("mps")
    if spec == "cpu":
        return torch.device("cpu")
    raise DistributedError(f"runtime.device={spec!r} is not understood (use auto, cpu, cuda, cuda:N or mps)")


# --------------------------------------------------------------------------- init
def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise DistributedError(f"environment variable {n}={v!r} is not an integer") from None
    return None


def init_distributed(device: str = "auto", timeout: _dt.timedelta | None = None) -> DistInfo:
    """Initialise the default process group from the launcher's environment (see module doc).

    Returns the rank/world/device of this process. Without ``WORLD_SIZE > 1`` (or Slurm with more than
    one task) nothing is initialised. Calling it again when a group exists returns the current info.
    """
    if is_distributed():
        dev = resolve_device(device, get_local_rank())
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(dist.get_rank(), dist.get_world_size(), get_local_rank(), dev, dist.get_backend())

    rank = _env_int("RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID")
    if world is None or world <= 1:
        dev = resolve_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(0, 1, 0, dev, None)
    if rank is None:
        raise DistributedError("WORLD_SIZE is set but RANK is not: launch with torchrun (sets both) or srun")
    if local is None:
        local = rank % max(torch.cuda.device_count(), 1)
    if "MASTER_ADDR" not in os.environ:
        raise DistributedError(
            "MASTER_ADDR is not set. Under torchrun it is set for you; under Slurm export the first host, e.g. "
            "`export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)` in the batch script")
    # the data loaders resolve rank/world from these too (Slurm-only launches do not export them)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    os.environ.setdefault("MASTER_PORT", "29500")
    dev = resolve_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective aborts, not hangs
    kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world,
                              "timeout": timeout or dist_timeout()}
    if backend == "nccl":
        kwargs["device_id"] = dev
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart not in (None, "0"):
        kwargs["store"] = _restart_store(rank, world, int(restart), kwargs["timeout"])
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # older torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    return DistInfo(rank, world, local, dev, backend)


def _restart_store(rank: int, world: int, restart: int, timeout: _dt.timedelta) -> "dist.Store":
    """The rendezvous store of a torchrun **restart** (``--max-restarts``), under a key prefix of its own.

    After a worker dies, torchrun restarts every worker against the same store server (the elastic agent's, or
    rank 0's), which still holds the previous attempt's keys -- among them each rank's Gloo / NCCL listening
    address. A restarted rank can read the dead process's address and fail with "Connection refused" (seen with
    gloo on CPU: ``tests/robustness/test_elastic_restart.py``). A per-restart prefix keeps the attempts apart.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world, is_master=(rank == 0 and not agent_hosts), timeout=timeout,
                          multi_tenant=not agent_hosts)
    return dist.PrefixStore(f"codetr/restart_{restart}/", store)


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives
def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: Any) -> Any:
    """Mean over ranks of a tensor, a float, or a dict of floats/tensors (identity without a group)."""
    if not is_distributed():
        return value
    world = get_world_size()
    if isinstance(value, dict):
        keys = sorted(value)
        if not keys:
            return {}
        t = torch.tensor([float(value[k]) for k in keys], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return {k: float(v) / world for k, v in zip(keys, t.tolist())}
    if isinstance(value, torch.Tensor):
        t = value.detach().clone()
        dist.all_reduce(t)
        return t / world
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item()) / world


def all_reduce_max(value: float) -> float:
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------- DDP
def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap in ``DistributedDataParallel`` (``find_unused_parameters=False``) when a group exists.

    The detector guarantees that every trainable parameter receives a gradient on every step (empty
    images and quiet auxiliary heads produce zero-weight losses that touch their parameters), so the
    faster static reduction is used. If that guarantee is broken, :func:`explain_ddp_error` turns DDP's
    error into one naming the parameters.
    """
    if not is_distributed() or get_world_size() == 1:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise DistributedError("cannot wrap a model without trainable parameters in DDP")
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        output_device=device.index if device.type == "cuda" else None,
        find_unused_parameters=False,
    )


def _ddp_param_names(model: nn.Module) -> list[str]:
    """Trainable parameter names in DDP's index order (``named_parameters`` order, deduplicated)."""
    base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return [n for n, p in base.named_parameters() if p.requires_grad]


def unused_parameter_names(model: nn.Module) -> list[str]:
    """Trainable parameters whose ``.grad`` is ``None`` (call right after a backward pass)."""
    base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return [n for n, p in base.named_parameters() if p.requires_grad and p.grad is None]


_UNUSED_FIX = (
    "every trainable parameter must receive a gradient on every step (find_unused_parameters=False). "
    "fix: make the module that owns them contribute a zero-weight loss when it has nothing to do "
    "(e.g. `loss = loss + 0.0 * sum(p.sum() for p in head.parameters())` for empty targets), freeze "
    "them (requires_grad=False), or remove the module from the recipe"
)


def explain_ddp_error(exc: BaseException, model: nn.Module) -> UnusedParametersError | None:
    """DDP's "Expected to have finished reduction" error -> :class:`UnusedParametersError` with names."""
    msg = str(exc)
    if "finished reduction" not in msg and "did not receive grad" not in msg and "unused parameters" not in msg:
        return None
    names = _ddp_param_names(model)
    idx: list[int] = []
    m = re.search(r"Parameter indices which did not receive grad for rank \d+:([\d\s]+)", msg)
    if m:
        idx = [int(x) for x in m.group(1).split()]
    listed = [names[i] for i in idx if 0 <= i < len(names)]
    m2 = re.search(r"Parameters which did not receive grad for rank \d+:\s*([^\n]+)", msg)
    if m2:
        listed = [s.strip() for s in m2.group(1).split(",") if s.strip()]
    who = ("parameters without gradient: " + ", ".join(listed[:20]) + (" ..." if len(listed) > 20 else "")) \
        if listed else "set TORCH_DISTRIBUTED_DEBUG=INFO to have DDP list them"
    return UnusedParametersError(f"DDP: some parameters did not receive a gradient in the previous step; {who}.\n"
                                 f"  {_UNUSED_FIX}")


def raise_unused(names: list[str], rank: int) -> None:
    raise UnusedParametersError(
        f"rank {rank}: {len(names)} trainable parameter(s) received no gradient in the first step: "
        + ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") + f"\n  {_UNUSED_FIX}")
