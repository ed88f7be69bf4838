"""Shard resolution and epoch planning: which shards a split has, and who reads which of them.

Owns the layout side of the streaming loader (semantics: :mod:`codetr.data.loader`):

* **resolution**: :func:`resolve_shards` turns an ``index.json``, a directory holding one, or shard
  URLs/patterns into a :class:`ShardSet` (URLs, per-shard counts, :class:`DatasetInfo`);
  :func:`resolve_rank_world` fixes ``(rank, world_size)`` once, in the main process.
* **planning**: :func:`plan_epoch` gives one rank's :class:`EpochPlan` (a :class:`WorkerPlan` per loader
  worker). Pure functions of the layout, so every rank and worker computes the same plan without
  communicating.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from codetr.core.dist import get_rank, get_world_size, is_distributed
from codetr.data.format import INDEX_FILENAME, CategoryInfo, DataError, load_index, parse_index
from codetr.data.remote import RemoteOptions, fetch_bytes
from codetr.data.transforms import sample_rng

__all__ = [
    "DatasetInfo",
    "ShardSet",
    "WorkerPlan",
    "EpochPlan",
    "resolve_rank_world",
    "resolve_shards",
    "plan_epoch",
]

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
    source: str | os.PathLike[str] | Sequence[str], num_samples: int | None = None, *, require_count: bool = True,
    remote: RemoteOptions | None = None,
) -> ShardSet:
    """Resolve an index file, a directory with ``index.json``, or shard URLs/patterns into a ShardSet.

    Local shard paths must exist. ``require_count=False`` (inspection tools) accepts bare URLs without
    ``num_samples`` (``info.num_samples`` is then 0). An ``http(s)://.../index.json`` is fetched (with the
    ``remote`` retries) and its shard names resolve relative to its URL, so a converted folder served over HTTP
    is used exactly like the local one.

    Raises:
        DataError: no index found and ``num_samples`` missing, empty URL list, or invalid index.
    """
    if isinstance(source, str) and source.startswith(("http://", "https://")) and source.endswith(".json"):
        index = parse_index(fetch_bytes(source, remote or RemoteOptions()), source)
        if index.num_samples == 0:
            raise DataError(f"{source}: the index lists no samples")
        return ShardSet(urls=tuple(index.shard_urls(source.rsplit("/", 1)[0])), sizes=tuple(index.shard_sizes),
                        info=DatasetInfo(index.num_samples, tuple(index.categories), source))
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
    """The plan of one rank for one epoch (semantics: :mod:`codetr.data.loader`)."""

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

