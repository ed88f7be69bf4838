"""The one home of "am I distributed, how many ranks, mean over ranks" (identity without a process group).

Everything that needs the world size or a cross-rank mean (loss normalisers in the heads and the
criterion, the evaluator, the engine) calls these; nothing else reads ``torch.distributed`` state.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "get_rank", "get_world_size", "reduce_mean"]


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def reduce_mean(value: Tensor) -> Tensor:
    """Mean of a tensor over all ranks, in MMDetection's ``reduce_mean`` order (divide, then sum).

    Returns ``value`` itself when not distributed (or with one rank), else a new tensor; the input is
    never modified. Used for the official loss normalisers (number of positives), so every rank divides
    by the same number.
    """
    world = get_world_size()
    if world == 1:
        return value
    out = value.clone().div_(world)
    dist.all_reduce(out)
    return out
