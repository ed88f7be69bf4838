"""The training data stream: epochs started and batches drawn without touching the model's RNG streams.

A torch ``DataLoader`` draws its base seed from the global torch RNG when an iterator starts; both
starting an epoch and drawing a batch therefore run under :func:`~codetr.engine.rng.isolated_rng`, so a
resumed run (which starts mid-epoch) sees exactly the RNG streams of an uninterrupted one. Resuming
mid-epoch restores the loader's ``state_dict`` when it has one, else skips the consumed batches.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from codetr.core.structures import Batch
from codetr.engine.checkpoint import CheckpointError
from codetr.engine.rng import isolated_rng

__all__ = ["next_batch", "start_epoch", "first_group"]


def next_batch(it: Iterator[Batch]) -> Batch:
    """``next(it)`` without consuming the global RNG streams."""
    # the torch DataLoader draws its base seed from the global torch RNG when it starts; keep that
    # draw out of the model's RNG stream so resumed runs (which start mid-epoch) match exactly
    with isolated_rng(None):
        return next(it)


def start_epoch(loader: Any, epoch: int, batch_in_epoch: int, data_state: Any = None) -> Iterator[Batch]:
    """An iterator over epoch ``epoch`` of ``loader`` positioned after its first ``batch_in_epoch`` batches.

    ``data_state`` (the saved ``loader.state_dict()``) is used to position a loader with
    ``load_state_dict``; a generic loader is re-iterated and the consumed batches skipped (slow but exact
    for deterministic loaders). ``set_epoch`` is called when the loader has it.
    """
    with isolated_rng(None):  # starting an epoch must not consume the model's RNG streams either
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if batch_in_epoch > 0:
            if data_state is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(data_state)
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                return iter(loader)
            it = iter(loader)
            for _ in range(batch_in_epoch):
                next_batch(it)
            return it
        return iter(loader)


def first_group(groups: Sequence[int], batch_in_epoch: int) -> int:
    """Index of the accumulation group (sizes ``groups``) that starts after ``batch_in_epoch`` batches;
    raises :class:`CheckpointError` when that position is not at a group (optimizer-step) boundary."""
    g_index, consumed = 0, 0
    while consumed < batch_in_epoch:
        consumed += groups[g_index]
        g_index += 1
    if consumed != batch_in_epoch:
        raise CheckpointError("the checkpoint's data position is not at an optimizer-step boundary: "
                              "resume with the same optim.accumulate_steps and data batch size")
    return g_index
