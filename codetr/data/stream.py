"""Streaming over webdataset shards: the worker-side dataset and :class:`ShardLoader`, which drives it.

Owns the reading side of the ``shards``/``index`` sources: ``_ShardStream`` is the per-epoch
``IterableDataset`` in which every DataLoader worker runs its :class:`~codetr.data.shards.WorkerPlan`
(shard reading, seeded buffer shuffle, decoding, corrupt-sample skipping, wrap-around in training,
padding batches in evaluation, fast-forward after a resume); :class:`ShardLoader` plans each epoch
(:func:`~codetr.data.shards.plan_epoch`) and hands the stream to a DataLoader.
Semantics: :mod:`codetr.data.loader`.
"""

from __future__ import annotations

import itertools
import os
import random
import warnings
from typing import Any, Iterable, Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from codetr.core.structures import Batch
from codetr.data.collate import Sample, collate
from codetr.data.decode import CorruptSampleError, blank_sample, decode_image, make_sample, parse_shard_sample
from codetr.data.format import DataError
from codetr.data.loader_base import DetectionLoader, LoaderOptions, _Item, _SkipCounter
from codetr.data.remote import RemoteOptions, is_remote, open_shard
from codetr.data.shards import EpochPlan, ShardSet, WorkerPlan, _worker_skip, plan_epoch, resolve_shards
from codetr.data.transforms import Transform, build_transforms, sample_rng

__all__ = ["ShardLoader"]


# ----------------------------------------------------------------------------------------------
# worker-side machinery
# ----------------------------------------------------------------------------------------------


def _where(raw: dict[str, Any]) -> str:
    return f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"


def _ignore_error(exn: Exception) -> bool:
    """webdataset handler of a worker whose tar-level errors another worker reports (keep reading)."""
    return True


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
        source: str = "",
        remote: RemoteOptions = RemoteOptions(),
    ):
        self.source = source or (urls[0] if urls else "?")
        self.urls = list(urls)
        self.plan = plan
        self.transform = transform
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.size_divisor = size_divisor
        self.pad_to = pad_to
        self.num_classes = num_classes
        self.skip_batches = skip_batches
        self.remote = remote

    # -- helpers -----------------------------------------------------------------------------
    def _collate(self, samples: list[Sample]) -> Batch:
        return collate(samples, self.size_divisor, self.pad_to)

    def _open(self, order: list[int], handler) -> Iterator[dict[str, Any]]:
        """``{"url", "stream"}`` per shard: local files through webdataset's opener (an unreadable one goes to
        ``handler``, i.e. the skip report); remote ones fetched whole with retries, raising
        :class:`~codetr.data.remote.ShardFetchError` (naming the URL) when every attempt fails."""
        from webdataset.tariterators import url_opener

        for i in order:
            url = self.urls[i]
            if not is_remote(url):
                yield from url_opener(iter([{"url": url}]), handler=handler)
                continue
            stream = open_shard(url, self.remote)
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    def _raw_pass(self, wp: WorkerPlan, cycle: int, counter: _SkipCounter) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        order = list(wp.shards)
        if cycle > 0:
            sample_rng("wrap", self.seed, self.plan.epoch, self.plan.rank, order, cycle).shuffle(order)
        # workers sharing their shards (stride > 1) all see the same tar-level errors: count them once
        handler = counter if wp.offset == 0 else _ignore_error
        stream = group_by_keys(tar_file_expander(self._open(order, handler), handler=handler), handler=handler)
        for i, raw in enumerate(stream):
            if i % wp.stride == wp.offset:
                yield raw

    def _decode(self, raw: dict[str, Any], cycle: int, counter: _SkipCounter) -> Sample | None:
        where = _where(raw)
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
        try:
            if self.plan.train:
                yield from self._iter_train(wp, counter, skip)
            else:
                yield from self._iter_eval(wp, counter, skip)
        except DataError as exc:  # handed over as data: the main process raises it (see DetectionLoader)
            yield counter.item(None, error=exc)
            return
        if counter.pending:
            yield counter.item(None)

    def _unusable(self, wp: WorkerPlan, what: str) -> DataError:
        shards = [self.urls[i] for i in wp.shards]
        named = ", ".join(shards[:3]) + (f" (+{len(shards) - 3} more)" if len(shards) > 3 else "")
        return DataError(
            f"{self.source}: no usable sample: {what} (rank {self.plan.rank} worker {wp.worker}, shards {named}); "
            f"check them with `codetr data inspect {self.source}` and re-convert the data "
            "(`codetr data convert ... --overwrite`)"
        )

    def _iter_train(self, wp: WorkerPlan, counter: _SkipCounter, skip: int) -> Iterator[_Item]:
        if wp.num_batches == 0:
            return
        B = self.plan.batch_size

        first_pass: list[int] = []  # raw samples in the first pass, once it is complete

        def endless() -> Iterator[tuple[int, dict[str, Any]]]:
            for cycle in itertools.count():
                n = 0
                for raw in self._raw_pass(wp, cycle, counter):
                    n += 1
                    yield cycle, raw
                if n == 0:
                    raise self._unusable(wp, "the shards hold no readable sample (not tar files, or every "
                                             f"member is unreadable; first error: {(counter.pending or ['?'])[0]})")
                if cycle == 0:
                    first_pass.append(n)

        rng = sample_rng("buffer", self.seed, self.plan.epoch, self.plan.rank, wp.worker)
        produced, pending_skip, failures_in_row, good = 0, 0, 0, 0
        bad_before_good: set[str] = set()  # distinct samples that failed while none decoded
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
                if good == 0:
                    bad_before_good.add(_where(raw))
                    if first_pass and len(bad_before_good) >= first_pass[0]:
                        raise self._unusable(wp, f"all {first_pass[0]} samples of the shards are corrupt "
                                                 f"(first: {counter.pending[0] if counter.pending else '?'})")
                if failures_in_row > limit:
                    raise self._unusable(wp, f"{failures_in_row} samples in a row failed to decode")
                continue
            failures_in_row, good = 0, good + 1
            bad_before_good.clear()
            batch.append(sample)
            if len(batch) == B:
                yield counter.item(self._collate(batch), len(batch))
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
                yield counter.item(self._collate(pending), len(pending))
                produced, pending = produced + 1, []
        if pending_fast or pending:  # partial last batch
            if pending:
                template = pending[-1]
                yield counter.item(self._collate(pending), len(pending))
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
                yield counter.item(self._collate([pad]))
            produced += 1


# ----------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------


class ShardLoader(DetectionLoader):
    """Streaming loader over webdataset shards (semantics: :mod:`codetr.data.loader`).

    Args:
        shards: a :class:`~codetr.data.shards.ShardSet` or anything
            :func:`~codetr.data.shards.resolve_shards` accepts.
        options: the shared :class:`~codetr.data.loader_base.LoaderOptions` (train/eval, batch size,
            workers, seed, rank/world size, padding, DataLoader settings).
        transform: pipeline from :func:`~codetr.data.transforms.build_transforms` (default: no
            augmentation); its ``canvas_size`` (LSJ) becomes the fixed padding canvas.
        shuffle_buffer: training sample-shuffle buffer (raw samples; 0 disables; unused for evaluation).
        num_samples: total samples, required for bare shard URLs without index.
    """

    def __init__(
        self,
        shards: ShardSet | str | os.PathLike[str] | Sequence[str],
        options: LoaderOptions,
        *,
        transform: Transform | None = None,
        shuffle_buffer: int = 1000,
        num_samples: int | None = None,
    ):
        shard_set = shards if isinstance(shards, ShardSet) else resolve_shards(shards, num_samples,
                                                                              remote=options.remote)
        super().__init__(info=shard_set.info, options=options)
        self.remote = options.remote
        self.shards = shard_set
        self.transform = transform if transform is not None else build_transforms({"kind": "none"}, self.train)
        self.shuffle_buffer = int(shuffle_buffer) if self.train else 0
        self.pad_to = getattr(self.transform, "canvas_size", None)
        plan = self.plan(0)  # validate the layout now (errors at build time, not mid-training)
        if not self.shards.sizes and not self.train:
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

    def _corrupt_hint(self) -> str:
        return (f"check the shards with `codetr data inspect {self.info.source}` and re-convert the data "
                "(`codetr data convert ... --overwrite`)")

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
            source=self.info.source,
            remote=self.remote,
        )
        return self._dataloader(dataset, batch_size=None)
