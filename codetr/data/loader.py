"""Loaders that turn shards (or a COCO folder) into :class:`~codetr.core.structures.Batch` es, DDP-safe.

Entry point: :func:`build_loader` (``DataSourceConfig`` + split -> :class:`DetectionLoader`). Iterating a
loader yields ``Batch`` objects; ``len(loader)`` is exact and identical on every rank.

Sources
-------
* ``index``: an ``index.json`` (or a directory holding one) written by ``codetr data convert``. Per-shard
  sample counts and categories come from it.
* ``shards``: shard URLs, a brace pattern (``/data/train-{000000..000099}.tar``), ``pipe:`` commands,
  ``http(s)://`` URLs, ... anything webdataset opens, plus ``num_samples`` (the total). If the shards are
  local files next to an ``index.json`` that lists them, counts and categories are taken from it.
* ``coco``: an annotation json + image folder read directly (:class:`CocoFolderDataset`), for tests and
  small sets; same semantics, map-style.

Distributed semantics (streaming)
---------------------------------
* ``rank``/``world_size`` are resolved **once**, in the main process, when the loader is built
  (``torch.distributed`` if initialised, else the ``RANK``/``WORLD_SIZE`` environment, else 0/1) and
  frozen into the plan that workers receive. Workers never look them up again.
* **Shard assignment.** Training shuffles the shard list with a seed shared by all ranks
  (``seed``, ``epoch``), rank ``r`` takes ``shards[r::world]``, worker ``w`` of that rank takes
  ``rank_shards[w::num_workers]``. Evaluation does the same without shuffling. With fewer shards than
  workers on a rank, every worker of the rank reads all its shards and keeps every ``num_workers``-th
  sample (correct, but more I/O: a warning says so). A rank without any shard is an error
  (:class:`~codetr.data.format.DataError`), never a hang. Per-rank sample skew > 10% is warned about.
* **Training epochs are planned.** Every rank yields exactly ``ceil(num_samples / (batch_size *
  world_size))`` full batches: worker ``w`` yields ``ceil((n - w) / num_workers)`` of them, wrapping
  around its own shards (reshuffled per wrap) until done, so a few samples repeat instead of any rank
  running short. Samples go through a seeded buffer shuffle (``shuffle_buffer``).
* **Evaluation is exactly once.** Every sample is read by exactly one rank and one worker. Ranks run the
  same number of batches: a rank with fewer batches gets extra batches of *padding samples* (copies of
  one of its images, or a blank image, with ``image_id == -1``; see :mod:`codetr.data.collate`). Drop
  predictions for negative image ids before gathering. The last batch of each worker may be partial.
* **Corrupt data** (unreadable tar members, undecodable images, bad json, wrong image size) is skipped
  with a ``RuntimeWarning`` naming the shard and key, and counted: :attr:`DetectionLoader.num_skipped`
  (total) and :attr:`DetectionLoader.num_skipped_epoch`. It never crashes the run. A worker whose shards
  yield no usable sample at all raises :class:`~codetr.data.format.DataError` instead of spinning.

Resuming
--------
:meth:`DetectionLoader.state_dict` stores ``epoch``, ``seed`` and ``batches_consumed`` (batches handed
out in the current epoch) plus the layout (``num_workers``, ``world_size``, ``batch_size``). After
:meth:`~DetectionLoader.load_state_dict` the next iteration starts at the same position:

* same layout: worker ``w`` fast-forwards over the ``ceil((k - w) / num_workers)`` batches it had
  produced (reading the annotations but not decoding images), so the remaining batches are exactly the
  ones the interrupted run would have produced. (Exception: if corrupt samples were skipped inside the
  fast-forwarded part, the stream is off by that many samples.)
* different layout: the position is converted to samples and the epoch continues from the equivalent
  batch with the new layout (with a warning); the sample order differs from the interrupted run, so some
  samples may repeat or be missed in that one epoch. The LR schedule stays aligned.

``set_epoch(e)`` selects the epoch (shard order and augmentation depend on it). It is optional: a fully
iterated epoch advances the epoch counter by itself.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from codetr.core.config.data import CocoSourceConfig, DataSourceConfig
from codetr.core.dist import get_rank, get_world_size, is_distributed
from codetr.core.structures import Batch
from codetr.data.coco import prepare_coco
from codetr.data.collate import Sample, collate
from codetr.data.decode import CorruptSampleError, blank_sample, decode_image, make_sample, parse_shard_sample
from codetr.data.format import INDEX_FILENAME, CategoryInfo, DataError, SampleMeta, load_index
from codetr.data.transforms import Transform, TransformPipeline, build_transforms, sample_rng

__all__ = [
    "DatasetInfo",
    "ShardSet",
    "WorkerPlan",
    "EpochPlan",
    "resolve_rank_world",
    "resolve_shards",
    "plan_epoch",
    "DetectionLoader",
    "ShardLoader",
    "CocoFolderDataset",
    "CocoFolderLoader",
    "CocoSourceConfig",
    "DataSourceConfig",
    "build_loader",
    "source_categories",
]

_STATE_VERSION = 1
_SKEW_WARN = 0.10


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What the engine needs to know about a split before reading it.

    Attributes:
        num_samples: images in the split.
        categories: categories in contiguous-label order (``None`` if unknown: shard URLs without index).
        source: human-readable origin (index path, first shard URL, annotation file).
    """

    num_samples: int
    categories: tuple[CategoryInfo, ...] | None
    source: str

    @property
    def num_classes(self) -> int | None:
        return None if self.categories is None else len(self.categories)

    @property
    def label_to_category_id(self) -> list[int] | None:
        return None if self.categories is None else [c.id for c in self.categories]

    @property
    def class_names(self) -> list[str] | None:
        return None if self.categories is None else [c.name for c in self.categories]


@dataclass(frozen=True)
class ShardSet:
    """Resolved shard URLs with their per-shard sample counts (``sizes`` is ``None`` when unknown)."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...] | None
    info: DatasetInfo


def resolve_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): explicit values, else ``torch.distributed`` if initialised, else the
    ``RANK``/``WORLD_SIZE`` environment variables, else (0, 1). Call in the main process only."""
    if rank is not None and world_size is not None:
        r, w = int(rank), int(world_size)
    elif is_distributed():
        r, w = get_rank(), get_world_size()
    else:
        r = int(os.environ.get("RANK", "0")) if rank is None else int(rank)
        w = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else int(world_size)
    if w < 1 or not 0 <= r < w:
        raise DataError(f"invalid rank/world_size {r}/{w} (need 0 <= rank < world_size)")
    return r, w


def _expand(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    from webdataset.shardlists import expand_urls

    items = [os.fspath(source)] if isinstance(source, (str, os.PathLike)) else [os.fspath(s) for s in source]
    urls: list[str] = []
    for item in items:
        urls.extend(expand_urls(item))
    return urls


def _is_local(url: str) -> bool:
    """True for plain file paths (not ``scheme://...`` URLs or ``pipe:`` commands)."""
    return "://" not in url and not url.startswith("pipe:")


def resolve_shards(
    source: str | os.PathLike[str] | Sequence[str], num_samples: int | None = None, *, require_count: bool = True
) -> ShardSet:
    """Resolve an index file, a directory with ``index.json``, or shard URLs/patterns into a ShardSet.

    Local shard paths must exist. ``require_count=False`` (inspection tools) accepts bare URLs without
    ``num_samples`` (``info.num_samples`` is then 0).

    Raises:
        DataError: no index found and ``num_samples`` missing, empty URL list, or invalid index.
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir() or p.suffix == ".json":
            index, root = load_index(p)
            if index.num_samples == 0:
                raise DataError(f"{p}: the index lists no samples")
            return ShardSet(
                urls=tuple(index.shard_urls(root)),
                sizes=tuple(index.shard_sizes),
                info=DatasetInfo(index.num_samples, tuple(index.categories), str(p)),
            )
    urls = _expand(source)
    if not urls:
        raise DataError(f"shards {source!r}: the pattern expands to no URL")
    missing = [u for u in urls if _is_local(u) and not os.path.exists(u)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(urls)} shard files not found: {', '.join(missing[:3])}"
            + (" ..." if len(missing) > 3 else "")
            + " (pass an index.json, a directory containing one, or existing shard paths/URLs)"
        )
    # Local shards next to an index that lists them: take counts and categories from it.
    if all(os.path.exists(u) for u in urls):
        parents = {str(Path(u).resolve().parent) for u in urls}
        if len(parents) == 1 and (Path(next(iter(parents))) / INDEX_FILENAME).exists():
            index, root = load_index(Path(next(iter(parents))) / INDEX_FILENAME)
            by_name = {s.file: s.num_samples for s in index.shards}
            names = [os.path.basename(u) for u in urls]
            if all(n in by_name for n in names):
                sizes = tuple(by_name[n] for n in names)
                if num_samples is not None and num_samples != sum(sizes):
                    raise DataError(
                        f"num_samples={num_samples} but {root / INDEX_FILENAME} says these shards hold {sum(sizes)}"
                    )
                return ShardSet(tuple(urls), sizes, DatasetInfo(sum(sizes), tuple(index.categories), urls[0]))
    if (num_samples is None or num_samples <= 0) and not require_count:
        return ShardSet(tuple(urls), None, DatasetInfo(0, None, urls[0]))
    if num_samples is None or num_samples <= 0:
        raise DataError(
            f"shards {source!r}: num_samples (total samples in these shards, > 0) is required when no "
            f"{INDEX_FILENAME} describes them; it makes epoch lengths exact"
        )
    return ShardSet(tuple(urls), None, DatasetInfo(int(num_samples), None, urls[0]))


# ----------------------------------------------------------------------------------------------
# planning (pure functions of the layout; identical on every rank and worker)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """What one loader worker of one rank reads and yields in one epoch.

    Attributes:
        worker: worker id in ``[0, num_workers)``.
        shards: shard indices in reading order (first pass; training reshuffles them on wrap-around).
        stride, offset: keep the stream samples ``i`` with ``i % stride == offset`` (``stride > 1`` only
            when a rank has fewer shards than workers).
        num_samples: samples this worker reads in one pass (estimated when shard sizes are unknown).
        num_batches: batches it must yield (training: full batches; eval: incl. padding batches).
    """

    worker: int
    shards: tuple[int, ...]
    stride: int
    offset: int
    num_samples: int
    num_batches: int


@dataclass(frozen=True)
class EpochPlan:
    """The plan of one rank for one epoch (see the module docstring)."""

    rank: int
    world_size: int
    epoch: int
    train: bool
    batch_size: int
    shard_order: tuple[int, ...]
    workers: tuple[WorkerPlan, ...]
    num_batches: int
    rank_samples: tuple[int, ...]
    sizes_known: bool
    notes: tuple[str, ...] = ()


def _assumed_sizes(num_samples: int, num_shards: int) -> list[int]:
    base, extra = divmod(num_samples, num_shards)
    return [base + (1 if i < extra else 0) for i in range(num_shards)]


def _split_rank(rank_shards: list[int], sizes: Sequence[int], num_workers: int) -> list[tuple[tuple[int, ...], int, int, int]]:
    """Per worker: (shards, stride, offset, samples)."""
    W = num_workers
    if len(rank_shards) >= W:
        out = []
        for w in range(W):
            mine = tuple(rank_shards[w::W])
            out.append((mine, 1, 0, sum(sizes[i] for i in mine)))
        return out
    total = sum(sizes[i] for i in rank_shards)
    return [(tuple(rank_shards), W, w, max(0, -(-(total - w) // W))) for w in range(W)]


def plan_epoch(
    sizes: Sequence[int] | None,
    num_shards: int,
    num_samples: int,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    train: bool,
    seed: int,
    epoch: int,
) -> EpochPlan:
    """Plan which shards each worker of ``rank`` reads and how many batches it yields.

    The result depends only on the arguments, so all ranks/workers agree without communicating.

    Raises:
        DataError: fewer shards than ranks, or a rank/worker that would have to yield batches from no data.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if num_shards < world_size:
        raise DataError(
            f"{num_shards} shard(s) cannot be split over {world_size} ranks: every rank needs at least one "
            "shard (a rank without data would hang DDP). Re-convert with a smaller --shard-size "
            f"(at most {max(1, num_samples // world_size)}) or use fewer ranks"
        )
    W = max(1, num_workers)
    sizes_known = sizes is not None
    sz = list(sizes) if sizes is not None else _assumed_sizes(num_samples, num_shards)
    order = list(range(num_shards))
    if train:
        sample_rng("shard-order", seed, epoch).shuffle(order)
    rank_shards = [order[r::world_size] for r in range(world_size)]
    rank_samples = tuple(sum(sz[i] for i in rs) for rs in rank_shards)
    if min(rank_samples) == 0:
        empty = [r for r, n in enumerate(rank_samples) if n == 0]
        raise DataError(f"ranks {empty} would get no samples (their shards are empty); re-convert with balanced shards")
    notes: list[str] = []
    if len(rank_shards[rank]) < W:
        notes.append(
            f"few shards: rank {rank} has {len(rank_shards[rank])} shard(s) for {W} workers, so each worker reads all "
            "of them and keeps 1/num_workers of the samples (more I/O); write more shards (smaller --shard-size)"
        )
    if max(rank_samples) and (max(rank_samples) - min(rank_samples)) / max(rank_samples) > _SKEW_WARN:
        notes.append(
            f"shard skew: ranks hold {min(rank_samples)}..{max(rank_samples)} samples"
            + (" (training repeats samples on the smaller ranks to keep batch counts equal)" if train else "")
            + "; use a shard count divisible by the world size"
        )

    splits = [_split_rank(rs, sz, W) for rs in rank_shards]
    mine = splits[rank]
    if train:
        total = math.ceil(num_samples / (batch_size * world_size))
        counts = [max(0, -(-(total - w) // W)) for w in range(W)]
        for w, (_, _, _, n) in enumerate(mine):
            if counts[w] > 0 and n == 0:
                raise DataError(
                    f"rank {rank} worker {w} has no samples but must yield {counts[w]} batches; "
                    "use fewer loader workers or write more shards"
                )
    else:
        per_rank = [sum(-(-n // batch_size) for (_, _, _, n) in split) for split in splits]
        total = max(per_rank)
        counts = [-(-n // batch_size) for (_, _, _, n) in mine]
        for k in range(total - per_rank[rank]):
            counts[k % W] += 1
    workers = tuple(
        WorkerPlan(worker=w, shards=s, stride=st, offset=off, num_samples=n, num_batches=counts[w])
        for w, (s, st, off, n) in enumerate(mine)
    )
    return EpochPlan(
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        train=train,
        batch_size=batch_size,
        shard_order=tuple(order),
        workers=workers,
        num_batches=total,
        rank_samples=rank_samples,
        sizes_known=sizes_known,
        notes=tuple(notes),
    )


def _worker_skip(consumed: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` produced among the first ``consumed`` (DataLoader round-robin order)."""
    return max(0, -(-(consumed - worker) // num_workers))


# ----------------------------------------------------------------------------------------------
# worker-side machinery
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


def _buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (``size <= 1``: no shuffling)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


class _ShardStream(IterableDataset):
    """The per-epoch iterable handed to the DataLoader; each worker runs its :class:`WorkerPlan`."""

    def __init__(
        self,
        urls: Sequence[str],
        plan: EpochPlan,
        *,
        transform: Transform,
        seed: int,
        shuffle_buffer: int,
        size_divisor: int,
        pad_to: tuple[int, int] | None,
        num_classes: int | None,
        skip_batches: int,
    ):
        self.urls = list(urls)
        self.plan = plan
        self.transform = transform
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.size_divisor = size_divisor
        self.pad_to = pad_to
        self.num_classes = num_classes
        self.skip_batches = skip_batches

    # -- helpers -----------------------------------------------------------------------------
    def _collate(self, samples: list[Sample]) -> Batch:
        return collate(samples, self.size_divisor, self.pad_to)

    def _raw_pass(self, wp: WorkerPlan, cycle: int, counter: _SkipCounter) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples

        order = list(wp.shards)
        if cycle > 0:
            sample_rng("wrap", self.seed, self.plan.epoch, self.plan.rank, order, cycle).shuffle(order)
        stream = tarfile_samples(iter([{"url": self.urls[i]} for i in order]), handler=counter)
        for i, raw in enumerate(stream):
            if i % wp.stride == wp.offset:
                yield raw

    def _decode(self, raw: dict[str, Any], cycle: int, counter: _SkipCounter) -> Sample | None:
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        try:
            meta, data = parse_shard_sample(raw)
            image = decode_image(data, meta, where)
        except CorruptSampleError as exc:
            counter.skip(str(exc))
            return None
        rng = sample_rng("aug", self.seed, self.plan.epoch, cycle, raw.get("__key__"))
        return make_sample(image, meta, self.transform, rng, self.num_classes, where)

    @staticmethod
    def _cheap_ok(raw: dict[str, Any]) -> bool:
        try:
            parse_shard_sample(raw)
            return True
        except CorruptSampleError:
            return False

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if W != len(self.plan.workers):
            raise RuntimeError(f"loader planned for {len(self.plan.workers)} workers but runs with {W}")
        wp = self.plan.workers[w]
        counter = _SkipCounter(f"rank {self.plan.rank} worker {w}")
        skip = _worker_skip(self.skip_batches, w, W)
        if self.plan.train:
            yield from self._iter_train(wp, counter, skip)
        else:
            yield from self._iter_eval(wp, counter, skip)
        if counter.pending:
            yield _Item(None, counter.take())

    def _iter_train(self, wp: WorkerPlan, counter: _SkipCounter, skip: int) -> Iterator[_Item]:
        if wp.num_batches == 0:
            return
        B = self.plan.batch_size

        def endless() -> Iterator[tuple[int, dict[str, Any]]]:
            for cycle in itertools.count():
                n = 0
                for raw in self._raw_pass(wp, cycle, counter):
                    n += 1
                    yield cycle, raw
                if n == 0:
                    raise DataError(
                        f"rank {self.plan.rank} worker {wp.worker}: shards "
                        f"{[self.urls[i] for i in wp.shards][:3]} yielded no readable sample"
                    )

        rng = sample_rng("buffer", self.seed, self.plan.epoch, self.plan.rank, wp.worker)
        produced, pending_skip, failures_in_row = 0, 0, 0
        batch: list[Sample] = []
        limit = max(1000, 2 * wp.num_samples)
        buffer = min(self.shuffle_buffer, max(1, wp.num_samples))  # larger buffers only re-read shards
        for cycle, raw in _buffer_shuffle(endless(), buffer, rng):
            if produced >= wp.num_batches:
                break
            if produced < skip:  # fast-forward after resume: no image decoding
                if self._cheap_ok(raw):
                    pending_skip += 1
                    if pending_skip == B:
                        produced, pending_skip = produced + 1, 0
                continue
            sample = self._decode(raw, cycle, counter)
            if sample is None:
                failures_in_row += 1
                if failures_in_row > limit:
                    raise DataError(
                        f"rank {self.plan.rank} worker {wp.worker}: {failures_in_row} samples in a row failed to "
                        "decode; the shards look unusable (see the warnings above)"
                    )
                continue
            failures_in_row = 0
            batch.append(sample)
            if len(batch) == B:
                yield _Item(self._collate(batch), counter.take())
                produced += 1
                batch = []

    def _iter_eval(self, wp: WorkerPlan, counter: _SkipCounter, skip: int) -> Iterator[_Item]:
        """One pass in order; partial last batch; then padding batches up to ``wp.num_batches``.

        Batch ``k`` of this worker is emitted only if ``k >= skip`` (resume); skipped batches are
        counted from the annotations alone, without decoding images.
        """
        B = self.plan.batch_size
        produced = 0  # batches of this worker so far, emitted or fast-forwarded
        pending: list[Sample] = []
        pending_fast = 0
        template: Sample | None = None
        for raw in self._raw_pass(wp, 0, counter):
            if produced < skip:
                pending_fast += self._cheap_ok(raw)
                if pending_fast == B:
                    produced, pending_fast = produced + 1, 0
                continue
            sample = self._decode(raw, 0, counter)
            if sample is None:
                continue
            pending.append(sample)
            if len(pending) == B:
                template = pending[-1]
                yield _Item(self._collate(pending), counter.take())
                produced, pending = produced + 1, []
        if pending_fast or pending:  # partial last batch
            if pending:
                template = pending[-1]
                yield _Item(self._collate(pending), counter.take())
            produced += 1
        if produced > wp.num_batches:
            warnings.warn(
                f"codetr.data (rank {self.plan.rank} worker {wp.worker}): produced {produced} batches, planned "
                f"{wp.num_batches}: the shards hold more samples than declared "
                f"({'index.json' if self.plan.sizes_known else 'num_samples'}); ranks may run unequal batch counts",
                RuntimeWarning,
                stacklevel=2,
            )
        pad = template.as_padding() if template is not None else blank_sample(self.transform)
        while produced < wp.num_batches:
            if produced >= skip:
                yield _Item(self._collate([pad]), counter.take())
            produced += 1


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------


class DetectionLoader:
    """Base class of the loaders returned by :func:`build_loader`: iterate to get ``Batch`` es.

    Attributes:
        info: :class:`DatasetInfo` (num_samples, categories -> ``num_classes``, label mapping).
        rank, world_size: frozen at construction.
        train: training (shuffled, augmented, planned epochs) or evaluation (exactly once) semantics.
        epoch: current epoch (see :meth:`set_epoch`).
    """

    def __init__(
        self,
        *,
        info: DatasetInfo,
        train: bool,
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int | None,
        world_size: int | None,
        pin_memory: bool,
        prefetch_factor: int,
        multiprocessing_context: Any,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        self.info = info
        self.train = train
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
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
        """Resume at ``state``'s position at the next iteration (see "Resuming" in the module doc)."""
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


class ShardLoader(DetectionLoader):
    """Streaming loader over webdataset shards (see the module docstring for the semantics).

    Args:
        shards: a :class:`ShardSet` or anything :func:`resolve_shards` accepts.
        train: training or evaluation semantics.
        batch_size: images per batch (per rank).
        transform: pipeline from :func:`~codetr.data.transforms.build_transforms`; its ``canvas_size``
            (LSJ) becomes the fixed padding canvas.
        num_workers: DataLoader worker processes (0 = load in the main process).
        shuffle_buffer: training sample-shuffle buffer (raw samples; 0 disables).
        seed: shared by all ranks; the shard order of epoch ``e`` depends on ``(seed, e)``.
        rank, world_size: explicit values (tests, custom launchers); ``None`` = resolve now, once.
        num_samples: total samples, required for bare shard URLs without index.
        size_divisor: pad batches to a multiple of this.
    """

    def __init__(
        self,
        shards: ShardSet | str | os.PathLike[str] | Sequence[str],
        *,
        train: bool,
        batch_size: int,
        transform: Transform | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_samples: int | None = None,
        size_divisor: int = 1,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: Any = None,
    ):
        shard_set = shards if isinstance(shards, ShardSet) else resolve_shards(shards, num_samples)
        super().__init__(
            info=shard_set.info,
            train=train,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            rank=rank,
            world_size=world_size,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            multiprocessing_context=multiprocessing_context,
        )
        self.shards = shard_set
        self.transform = transform if transform is not None else build_transforms({"kind": "none"}, train)
        self.shuffle_buffer = int(shuffle_buffer) if train else 0
        self.size_divisor = size_divisor
        self.pad_to = getattr(self.transform, "canvas_size", None)
        plan = self.plan(0)  # validate the layout now (errors at build time, not mid-training)
        if not self.shards.sizes and not train:
            self._warn_once(
                "per-shard sample counts unknown (no index.json): evaluation assumes balanced shards to "
                "equalise batch counts across ranks"
            )
        for note in plan.notes:
            self._warn_once(note)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The :class:`EpochPlan` of this rank for ``epoch`` (default: the current epoch)."""
        return plan_epoch(
            self.shards.sizes,
            len(self.shards.urls),
            self.info.num_samples,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            train=self.train,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
        )

    def __len__(self) -> int:
        return self.plan(0).num_batches

    def _items(self, skip: int) -> Iterable[_Item]:
        plan = self.plan()
        for note in plan.notes:
            self._warn_once(note)
        dataset = _ShardStream(
            self.shards.urls,
            plan,
            transform=self.transform,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            size_divisor=self.size_divisor,
            pad_to=self.pad_to,
            num_classes=self.info.num_classes,
            skip_batches=skip,
        )
        return self._dataloader(dataset, batch_size=None)


# ----------------------------------------------------------------------------------------------
# map-style: COCO json + image folder
# ----------------------------------------------------------------------------------------------


class CocoFolderDataset(Dataset):
    """Map-style dataset reading a COCO json + image folder directly (validated like the converter).

    ``dataset[i]`` returns a :class:`~codetr.data.collate.Sample` (image transformed and normalised,
    boxes xyxy pixels of the transformed image). Augmentation randomness comes from
    ``(seed, epoch, i)``; set :attr:`epoch` to vary it. Decoding errors raise
    :class:`~codetr.data.decode.CorruptSampleError` (the loader skips and counts them).
    """

    def __init__(
        self,
        ann_json: str | os.PathLike[str],
        images_dir: str | os.PathLike[str],
        transform: Transform | None = None,
        *,
        seed: int = 0,
    ):
        prepared = prepare_coco(ann_json, images_dir)
        self.records = prepared.records
        self.prepared_warnings = prepared.warnings
        self.counts = prepared.counts
        self.info = DatasetInfo(len(self.records), tuple(prepared.categories), str(ann_json))
        self.transform = transform if transform is not None else build_transforms({"kind": "none"}, False)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def meta(self, index: int) -> SampleMeta:
        return SampleMeta.model_validate(self.records[index].meta)

    def load(self, index: int, position: int | None = None) -> Sample:
        rec = self.records[index]
        meta = self.meta(index)
        try:
            with open(rec.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise CorruptSampleError(f"{rec.path}: cannot read ({exc})") from exc
        image = decode_image(data, meta, rec.path)
        rng = sample_rng("aug", self.seed, self.epoch, index if position is None else position)
        return make_sample(image, meta, self.transform, rng, self.info.num_classes, rec.path)

    def __getitem__(self, index: int) -> Sample:
        return self.load(index)


@dataclass
class _Failed:
    what: str


class _MapAdapter(Dataset):
    """Wraps CocoFolderDataset for the loader: codes are ``(index, position, is_padding)``."""

    def __init__(self, dataset: CocoFolderDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, code: tuple[int, int, bool]) -> Sample | _Failed:
        index, position, padding = code
        try:
            sample = self.dataset.load(index, position)
        except CorruptSampleError as exc:
            return _Failed(str(exc))
        return sample.as_padding() if padding else sample


@dataclass
class _MapCollate:
    transform: Transform
    size_divisor: int
    pad_to: tuple[int, int] | None
    where: str = "coco loader"

    def __call__(self, items: list[Sample | _Failed]) -> _Item:
        counter = _SkipCounter(self.where)
        samples = []
        for it in items:
            if isinstance(it, _Failed):
                counter.skip(it.what)
            else:
                samples.append(it)
        if not samples:  # keep the batch count exact
            samples = [blank_sample(self.transform)]
        return _Item(collate(samples, self.size_divisor, self.pad_to), counter.take())


class CocoFolderLoader(DetectionLoader):
    """Loader over a :class:`CocoFolderDataset` with the same rank/epoch semantics as :class:`ShardLoader`.

    Training: a permutation of all images shared by the ranks (seed, epoch); rank ``r`` takes every
    ``world_size``-th image, wrapped around to ``ceil(N / (batch * world))`` full batches. Evaluation:
    rank ``r`` takes images ``r::world_size`` exactly once, padded with ``image_id == -1`` batches to the
    batch count of rank 0.
    """

    def __init__(
        self,
        dataset: CocoFolderDataset,
        *,
        train: bool,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        size_divisor: int = 1,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        multiprocessing_context: Any = None,
    ):
        super().__init__(
            info=dataset.info,
            train=train,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            rank=rank,
            world_size=world_size,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            multiprocessing_context=multiprocessing_context,
        )
        n = len(dataset)
        if n < self.world_size:
            raise DataError(
                f"{dataset.info.source}: {n} images cannot be split over {self.world_size} ranks "
                "(every rank needs at least one image)"
            )
        self.dataset = dataset
        self.size_divisor = size_divisor
        self.pad_to = getattr(dataset.transform, "canvas_size", None)

    def __len__(self) -> int:
        n, W, B = len(self.dataset), self.world_size, self.batch_size
        if self.train:
            return math.ceil(n / (B * W))
        return math.ceil(math.ceil(n / W) / B)

    def batches(self, epoch: int | None = None) -> list[list[tuple[int, int, bool]]]:
        """This rank's batches of ``(image index, position, is_padding)`` for ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        n, W, B, r = len(self.dataset), self.world_size, self.batch_size, self.rank
        nb = len(self)
        if self.train:
            perm = list(range(n))
            sample_rng("perm", self.seed, epoch).shuffle(perm)
            mine = perm[r::W]
            need = nb * B
            seq = (mine * (need // len(mine) + 1))[:need]
            codes = [(idx, r * need + p, False) for p, idx in enumerate(seq)]
            return [codes[i : i + B] for i in range(0, need, B)]
        mine = list(range(r, n, W))
        out = [[(idx, idx, False) for idx in mine[i : i + B]] for i in range(0, len(mine), B)]
        while len(out) < nb:
            out.append([(mine[-1], mine[-1], True)])
        return out

    def _items(self, skip: int) -> Iterable[_Item]:
        self.dataset.epoch = self.epoch
        batches = self.batches()[skip:]
        collate_fn = _MapCollate(self.dataset.transform, self.size_divisor, self.pad_to, f"rank {self.rank}")
        return self._dataloader(_MapAdapter(self.dataset), batch_sampler=batches, collate_fn=collate_fn)


# ----------------------------------------------------------------------------------------------
# config + builder
# ----------------------------------------------------------------------------------------------


def source_categories(cfg: DataSourceConfig | dict[str, Any]) -> list[dict[str, Any]] | None:
    """Categories of a data source in contiguous-label order, without reading any image or shard.

    Used to derive ``num_classes`` and the label <-> category-id mapping from a recipe. Reads only the
    ``index.json`` (``index`` source, or ``shards`` that sit next to one) or the ``categories`` list of
    the COCO file (``coco`` source; the file is parsed but not validated here).

    Returns:
        ``[{"id": coco_id, "name": ..., "supercategory": ...}, ...]`` sorted by id (label ``i`` is entry
        ``i``), or ``None`` for bare shard URLs without an index.

    Raises:
        DataError: the index / annotation file is missing or invalid.
    """
    import json

    from codetr.data.format import category_mapping

    if not isinstance(cfg, DataSourceConfig):
        cfg = DataSourceConfig.model_validate(cfg)
    if cfg.coco is not None:
        path = Path(cfg.coco.ann_file)
        try:
            with open(path, "rb") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the COCO annotation file ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
            raise DataError(f"{path}: missing or invalid 'categories' list (COCO detection format expected)")
        cats, _ = category_mapping(data["categories"])
    else:
        source: Any = cfg.index if cfg.index is not None else cfg.shards
        info = resolve_shards(source, cfg.num_samples, require_count=False).info
        if info.categories is None:
            return None
        cats = list(info.categories)
    return [c.model_dump() for c in cats]


def build_loader(
    cfg: DataSourceConfig | dict[str, Any],
    split: str = "train",
    *,
    train: bool | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    multiprocessing_context: Any = None,
) -> DetectionLoader:
    """Build the loader of one split.

    Args:
        cfg: the split's :class:`DataSourceConfig` (dicts are validated).
        split: split name; ``"train"`` means training semantics unless ``train`` says otherwise.
        train: force training (True) or evaluation (False) semantics.
        seed: base seed shared by all ranks (shard order, shuffling, augmentation).
        rank, world_size: override the distributed layout (default: resolved once, here).
        pin_memory: pin batch tensors (for CUDA training).

    Returns:
        A :class:`DetectionLoader` (``ShardLoader`` or ``CocoFolderLoader``): iterate for ``Batch`` es;
        ``len()`` is the exact number of batches per epoch on every rank; ``.info.num_classes`` and
        ``.info.label_to_category_id`` give the class mapping; ``set_epoch``, ``state_dict``,
        ``load_state_dict``, ``num_skipped``.
    """
    if not isinstance(cfg, DataSourceConfig):
        cfg = DataSourceConfig.model_validate(cfg)
    is_train = (split == "train") if train is None else bool(train)
    transform: TransformPipeline = build_transforms(cfg.transforms, is_train)
    common = dict(
        train=is_train,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        seed=seed,
        rank=rank,
        world_size=world_size,
        size_divisor=cfg.size_divisor,
        pin_memory=pin_memory,
        prefetch_factor=cfg.prefetch_factor,
        multiprocessing_context=multiprocessing_context,
    )
    if cfg.coco is not None:
        dataset = CocoFolderDataset(cfg.coco.ann_file, cfg.coco.images_dir, transform, seed=seed)
        return CocoFolderLoader(dataset, **common)  # type: ignore[arg-type]
    source: Any = cfg.index if cfg.index is not None else cfg.shards
    return ShardLoader(
        source,
        transform=transform,
        shuffle_buffer=cfg.shuffle_buffer,
        num_samples=cfg.num_samples,
        **common,  # type: ignore[arg-type]
    )
