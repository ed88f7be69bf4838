"""The loader contract shared by both sources: :class:`LoaderOptions` and :class:`DetectionLoader`.

Owns what the shard loader (:mod:`codetr.data.stream`) and the COCO-folder loader
(:mod:`codetr.data.coco_folder`) have in common: their shared options, the epoch/position bookkeeping
(``set_epoch``, ``state_dict``/``load_state_dict``, skipped-sample counters) and the small protocol by
which workers hand batches and skip counts back to the main process (``_Item``, ``_SkipCounter``).
Semantics (distributed, resuming): :mod:`codetr.data.loader`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from torch.utils.data import DataLoader

from codetr.core.structures import Batch
from codetr.data.format import DataError
from codetr.data.shards import DatasetInfo, resolve_rank_world

__all__ = ["LoaderOptions", "DetectionLoader"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class LoaderOptions:
    """Options every loader takes (:class:`~codetr.data.stream.ShardLoader` and
    :class:`~codetr.data.coco_folder.CocoFolderLoader`); :func:`~codetr.data.loader.build_loader` fills
    them from the split's ``DataSourceConfig`` and its own arguments.

    Attributes:
        train: training semantics (shuffled, augmented, planned epochs of full batches) or evaluation
            semantics (every sample exactly once, padding batches to equal counts).
        batch_size: images per batch, per rank (``>= 1``).
        num_workers: DataLoader worker processes (``>= 0``; 0 = load in the main process).
        seed: base seed shared by all ranks; shard/image order and augmentation of epoch ``e`` depend on
            ``(seed, e)``.
        rank: this process's rank (``None`` = resolve once, when the loader is built: see
            :func:`~codetr.data.shards.resolve_rank_world`).
        world_size: number of ranks (``None`` = resolve once, like ``rank``).
        size_divisor: pad batch tensors to a multiple of this (on top of a transform's fixed canvas).
        pin_memory: pin batch tensors in page-locked memory (for CUDA training).
        prefetch_factor: batches each worker loads ahead (used only with ``num_workers > 0``).
        multiprocessing_context: DataLoader worker start method/context (``None`` = torch's default;
            used only with ``num_workers > 0``).

    Raises:
        DataError: ``batch_size < 1`` or ``num_workers < 0``.
    """

    train: bool
    batch_size: int
    num_workers: int = 0
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    size_divisor: int = 1
    pin_memory: bool = False
    prefetch_factor: int = 2
    multiprocessing_context: Any = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {self.num_workers}")


# ----------------------------------------------------------------------------------------------
# worker -> main process
# ----------------------------------------------------------------------------------------------


@dataclass
class _Item:
    """What workers send to the main process: a batch (or ``None``) + samples skipped since the last item."""

    batch: Batch | None
    skipped: int = 0

    def pin_memory(self) -> "_Item":
        if self.batch is None:
            return self
        b = self.batch
        return _Item(
            Batch(
                images=b.images.pin_memory(),
                masks=b.masks.pin_memory(),
                targets=b.targets,
                image_sizes=b.image_sizes,
                orig_sizes=b.orig_sizes,
                image_ids=b.image_ids,
            ),
            self.skipped,
        )


class _SkipCounter:
    """Counts and warns about skipped corrupt data inside a worker; doubles as a webdataset handler."""

    def __init__(self, where: str):
        self.where = where
        self.pending = 0

    def skip(self, what: str) -> None:
        self.pending += 1
        warnings.warn(f"codetr.data ({self.where}): skipped corrupt sample: {what}", RuntimeWarning, stacklevel=2)

    def __call__(self, exn: Exception) -> bool:
        self.skip(f"{type(exn).__name__}: {exn}")
        return True

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


# ----------------------------------------------------------------------------------------------
# base loader
# ----------------------------------------------------------------------------------------------


class DetectionLoader:
    """Base class of the loaders returned by :func:`~codetr.data.loader.build_loader`: iterate to get ``Batch`` es.

    Attributes:
        info: :class:`DatasetInfo` (num_samples, categories -> ``num_classes``, label mapping).
        rank, world_size: frozen at construction.
        train: training (shuffled, augmented, planned epochs) or evaluation (exactly once) semantics.
        epoch: current epoch (see :meth:`set_epoch`).
        options: the :class:`LoaderOptions` it was built with (``seed`` may differ after a resume).
    """

    def __init__(self, *, info: DatasetInfo, options: LoaderOptions):
        self.info = info
        self.options = options  # as built; ``seed`` and ``epoch`` below change on resume
        self.train = options.train
        self.batch_size = int(options.batch_size)
        self.num_workers = int(options.num_workers)
        self.seed = int(options.seed)
        self.rank, self.world_size = resolve_rank_world(options.rank, options.world_size)
        self.size_divisor = options.size_divisor
        self.pin_memory = options.pin_memory
        self.prefetch_factor = options.prefetch_factor
        self.multiprocessing_context = options.multiprocessing_context
        self.epoch = 0
        self._consumed = 0
        self._resume_skip = 0
        self._num_skipped = 0
        self._num_skipped_epoch = 0
        self._warned: set[str] = set()

    # -- to implement ----------------------------------------------------------------------------
    def _items(self, skip: int) -> Iterable[_Item]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    # -- common ---------------------------------------------------------------------------------
    @property
    def num_skipped(self) -> int:
        """Corrupt samples skipped since the loader was built (all workers)."""
        return self._num_skipped

    @property
    def num_skipped_epoch(self) -> int:
        """Corrupt samples skipped in the current/last epoch."""
        return self._num_skipped_epoch

    @property
    def batches_consumed(self) -> int:
        """Batches handed out in the current epoch."""
        return self._consumed

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate next (shard order and augmentation depend on it)."""
        if epoch != self.epoch:
            self._consumed = 0
            self._resume_skip = 0
        self.epoch = int(epoch)

    def _warn_once(self, message: str) -> None:
        """Warn once per loader and kind of message (the text before the first ':')."""
        kind = message.split(":", 1)[0]
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"codetr.data: {message}", RuntimeWarning, stacklevel=3)

    def _dataloader(self, dataset: Any, **kw: Any) -> DataLoader:
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra["prefetch_factor"] = self.prefetch_factor
            if self.multiprocessing_context is not None:
                extra["multiprocessing_context"] = self.multiprocessing_context
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            **kw,
            **extra,
        )

    def __iter__(self) -> Iterator[Batch]:
        skip, self._resume_skip = self._resume_skip, 0
        self._consumed = skip
        self._num_skipped_epoch = 0
        for item in self._items(skip):
            if item.skipped:
                self._num_skipped += item.skipped
                self._num_skipped_epoch += item.skipped
            if item.batch is None:
                continue
            self._consumed += 1
            yield item.batch
        self.epoch += 1
        self._consumed = 0

    def state_dict(self) -> dict[str, Any]:
        """Position in the data stream (store it in checkpoints)."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "batches_consumed": self._consumed,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.info.num_samples,
            "train": self.train,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position at the next iteration (see "Resuming" in :mod:`codetr.data.loader`)."""
        try:
            epoch, seed, consumed = int(state["epoch"]), int(state["seed"]), int(state["batches_consumed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"invalid loader state {state!r}: needs epoch, seed, batches_consumed") from exc
        self.epoch, self.seed = epoch, seed
        same = (
            state.get("num_workers") == self.num_workers
            and state.get("world_size") == self.world_size
            and state.get("batch_size") == self.batch_size
        )
        if not same and consumed > 0:
            old = int(state.get("batch_size", self.batch_size)) * int(state.get("world_size", self.world_size))
            new_consumed = min(len(self), (consumed * old) // (self.batch_size * self.world_size))
            warnings.warn(
                "codetr.data: resuming with a different loader layout (num_workers/world_size/batch_size "
                f"{state.get('num_workers')}/{state.get('world_size')}/{state.get('batch_size')} -> "
                f"{self.num_workers}/{self.world_size}/{self.batch_size}); epoch {epoch} continues at batch "
                f"{new_consumed} of {len(self)} but its remaining samples differ from the interrupted run",
                RuntimeWarning,
                stacklevel=2,
            )
            consumed = new_consumed
        self._resume_skip = self._consumed = min(consumed, len(self))
