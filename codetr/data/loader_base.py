"""The loader contract shared by both sources: :class:`LoaderOptions` and :class:`DetectionLoader`.

Owns what the shard loader (:mod:`codetr.data.stream`) and the COCO-folder loader
(:mod:`codetr.data.coco_folder`) have in common: their shared options, the epoch/position bookkeeping
(``set_epoch``, ``state_dict``/``load_state_dict``, skipped-sample counters) and the small protocol by
which workers hand batches and skip counts back to the main process (``_Item``, ``_SkipCounter``).
Semantics (distributed, resuming): :mod:`codetr.data.loader`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from torch.utils.data import DataLoader

from codetr.core.structures import Batch
from codetr.data.format import DataError
from codetr.data.remote import RemoteOptions
from codetr.data.shards import DatasetInfo, resolve_rank_world

__all__ = ["LoaderOptions", "DetectionLoader", "SkipReport"]

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
        remote: how ``http(s)://`` / ``pipe:`` shards are fetched (retries, back-off, time-out; see
            :mod:`codetr.data.remote`).

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
    remote: RemoteOptions = field(default_factory=RemoteOptions)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {self.num_workers}")


# ----------------------------------------------------------------------------------------------
# worker -> main process
# ----------------------------------------------------------------------------------------------

#: How many skipped samples a :class:`SkipReport` names (the count is always complete).
MAX_SKIP_EXAMPLES = 5


@dataclass
class _Item:
    """What workers send to the main process (the same objects flow with ``num_workers=0``).

    ``batch`` (or ``None``), ``good`` (real samples in it), ``failed`` (one description per corrupt sample
    skipped since the previous item, ``where`` names the worker) and ``error``: a :class:`DataError`
    raised inside a worker, handed over as data so that the main process raises it with its own clean
    message instead of torch's "Caught DataError in DataLoader worker process" traceback.
    """

    batch: Batch | None
    failed: tuple[str, ...] = ()
    good: int = 0
    where: str = ""
    error: DataError | None = None

    @property
    def skipped(self) -> int:
        return len(self.failed)

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
            self.failed,
            self.good,
            self.where,
            self.error,
        )


class _SkipCounter:
    """Collects skipped corrupt data inside a worker; doubles as a webdataset handler.

    It does not warn: the descriptions travel to the main process in :attr:`_Item.failed`, which warns
    (one ``RuntimeWarning`` per sample, in the main process, whatever ``num_workers`` is) and counts.
    ``quiet=True`` (a worker that shares its shards with others, see ``WorkerPlan.stride``) drops
    tar-level errors, which the worker with offset 0 reports, so they are counted once.
    """

    def __init__(self, where: str):
        self.where = where
        self.pending: list[str] = []

    def skip(self, what: str) -> None:
        self.pending.append(what)

    def __call__(self, exn: Exception) -> bool:
        args = exn.args
        if len(args) >= 2 and isinstance(args[-1], str) and args[-1]:  # webdataset: (message, stream, url)
            self.skip(f"{args[-1]}: unreadable tar data ({type(exn).__name__}: {args[0]})")
        else:
            self.skip(f"{type(exn).__name__}: {exn}")
        return True

    def take(self) -> tuple[str, ...]:
        out, self.pending = tuple(self.pending), []
        return out

    def item(self, batch: Batch | None, good: int = 0, error: DataError | None = None) -> _Item:
        """An :class:`_Item` carrying ``batch`` and the samples skipped since the previous one."""
        return _Item(batch, self.take(), good, self.where, error)


@dataclass(frozen=True)
class SkipReport:
    """Corrupt samples a loader skipped: see :meth:`DetectionLoader.skip_report`.

    Attributes:
        epoch: the epoch the counts are about (the current one while iterating, else the last one).
        count: samples skipped in that epoch (every skip counts: a corrupt sample read again when
            training wraps around is counted again).
        total: samples skipped since the loader was built (all epochs, all workers).
        examples: the first :data:`MAX_SKIP_EXAMPLES` distinct skipped samples of that epoch, each
            ``"<shard url>:<key>: <reason>"`` or ``"<image file>: <reason>"``.
    """

    epoch: int
    count: int
    total: int
    examples: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.count > 0

    def message(self) -> str:
        """One line for the console, e.g. ``2 corrupt samples skipped in epoch 3 (5 since the start): ...``."""
        if not self.count:
            return f"no corrupt sample skipped in epoch {self.epoch}"
        more = f" (+{self.count - len(self.examples)} more)" if self.count > len(self.examples) else ""
        noun = "sample" if self.count == 1 else "samples"
        return (f"{self.count} corrupt {noun} skipped in epoch {self.epoch} ({self.total} since the start): "
                + "; ".join(self.examples) + more)


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
        self._skip_epoch = 0  # the epoch the *_epoch counters are about
        self._skip_examples: list[str] = []
        self._good_epoch = 0  # real samples handed out in the current/last epoch
        self._bad_before_good: set[str] = set()  # distinct skipped samples while no good one was seen
        self._warned: set[str] = set()

    # -- to implement ----------------------------------------------------------------------------
    def _items(self, skip: int) -> Iterable[_Item]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def _distinct_samples(self) -> int | None:
        """Distinct samples this rank reads in the epoch being iterated, when the main process knows it
        (then "all of them were corrupt" is detected as soon as it is certain); ``None``: only at the end."""
        return None

    def _corrupt_hint(self) -> str:
        """How to find and fix corrupt data of this source (the end of the "no usable sample" error)."""
        return "check the data with `codetr data inspect`"

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
    def skipped_examples(self) -> tuple[str, ...]:
        """The first few distinct corrupt samples skipped in the current/last epoch (see :class:`SkipReport`)."""
        return tuple(self._skip_examples)

    def skip_report(self) -> SkipReport:
        """Corrupt samples skipped in the current/last epoch and since the loader was built.

        Read it after an epoch's iteration ended (the counters of an epoch are reset when the next one
        starts); ``report.count`` is the epoch's count, ``report.message()`` a line for the console. The
        data layer itself prints nothing: it only warns (``RuntimeWarning``, in the main process) once
        per skipped sample.
        """
        return SkipReport(self._skip_epoch, self._num_skipped_epoch, self._num_skipped, tuple(self._skip_examples))

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
        self._skip_epoch, self._num_skipped_epoch, self._skip_examples = self.epoch, 0, []
        self._good_epoch, self._bad_before_good = 0, set()
        distinct = self._distinct_samples()
        items: Any = iter(self._items(skip))
        try:
            for item in items:
                self._account(item, distinct)
                if item.batch is None:
                    continue
                self._consumed += 1
                yield item.batch
        finally:
            items = None  # shut the DataLoader's workers down now, also when an error propagates
        if self._good_epoch == 0 and self._num_skipped_epoch > 0:
            raise self._no_usable_sample()
        self.epoch += 1
        self._consumed = 0

    def _account(self, item: _Item, distinct: int | None) -> None:
        """Main-process side of an :class:`_Item`: raise a worker's error, warn about and count skips."""
        for what in item.failed:
            warnings.warn(f"codetr.data ({item.where}): skipped corrupt sample: {what}", RuntimeWarning, stacklevel=3)
            if len(self._skip_examples) < MAX_SKIP_EXAMPLES and what not in self._skip_examples:
                self._skip_examples.append(what)
            if self._good_epoch == 0 and item.good == 0:
                self._bad_before_good.add(what)
        self._num_skipped += item.skipped
        self._num_skipped_epoch += item.skipped
        self._good_epoch += item.good
        if item.error is not None:
            raise item.error
        if self._good_epoch == 0 and distinct is not None and len(self._bad_before_good) >= distinct:
            raise self._no_usable_sample()

    def _no_usable_sample(self) -> DataError:
        first = "; ".join(self._skip_examples[:3])
        return DataError(
            f"{self.info.source}: no usable sample: nothing rank {self.rank} read in epoch {self._skip_epoch} could "
            f"be used ({self._num_skipped_epoch} corrupt sample(s) or unreadable shard(s) skipped; first: {first}); "
            f"{self._corrupt_hint()}"
        )

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
