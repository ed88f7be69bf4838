"""Map-style COCO source: a COCO json + image folder read directly, and its loader.

Owns the ``coco`` source (tests and small sets): :class:`CocoFolderDataset` (validated like the
converter, same decode path as the shards) and :class:`CocoFolderLoader`, which gives it the rank/epoch
semantics of :class:`~codetr.data.stream.ShardLoader` (see :mod:`codetr.data.loader`) through a batch
sampler of ``(index, position, is_padding)`` codes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable

from torch.utils.data import Dataset

from codetr.data.coco import prepare_coco
from codetr.data.collate import Sample, collate
from codetr.data.decode import CorruptSampleError, blank_sample, decode_image, make_sample
from codetr.data.format import DataError, SampleMeta
from codetr.data.loader_base import DetectionLoader, LoaderOptions, _Item, _SkipCounter
from codetr.data.shards import DatasetInfo
from codetr.data.transforms import Transform, build_transforms, sample_rng

__all__ = ["CocoFolderDataset", "CocoFolderLoader"]


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
    """A sample that could not be used: corrupt (``what``, skipped and counted) or a :class:`DataError`
    (``error``: a configuration problem, raised by the main process)."""

    what: str
    error: DataError | None = None


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
            if padding:  # a padding copy of a corrupt image: a blank one (the image was counted already)
                return blank_sample(self.dataset.transform)
            return _Failed(str(exc))
        except DataError as exc:
            return _Failed(str(exc), exc)
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
                if it.error is not None:
                    return counter.item(None, error=it.error)
                counter.skip(it.what)
            else:
                samples.append(it)
        good = sum(1 for s in samples if s.image_id >= 0)
        if not samples:  # keep the batch count exact
            samples = [blank_sample(self.transform)]
        return counter.item(collate(samples, self.size_divisor, self.pad_to), good)


class CocoFolderLoader(DetectionLoader):
    """Loader over a :class:`CocoFolderDataset` with the same rank/epoch semantics as
    :class:`~codetr.data.stream.ShardLoader`.

    Training: a permutation of all images shared by the ranks (seed, epoch); rank ``r`` takes every
    ``world_size``-th image, wrapped around to ``ceil(N / (batch * world))`` full batches. Evaluation:
    rank ``r`` takes images ``r::world_size`` exactly once, padded with ``image_id == -1`` batches to the
    batch count of rank 0.

    Args:
        dataset: the images (its ``transform`` is the loader's transform).
        options: the shared :class:`~codetr.data.loader_base.LoaderOptions` (train/eval, batch size,
            workers, seed, rank/world size, padding, DataLoader settings).
    """

    def __init__(self, dataset: CocoFolderDataset, options: LoaderOptions):
        super().__init__(info=dataset.info, options=options)
        n = len(dataset)
        if n < self.world_size:
            raise DataError(
                f"{dataset.info.source}: {n} images cannot be split over {self.world_size} ranks "
                "(every rank needs at least one image)"
            )
        self.dataset = dataset
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

    def _distinct_samples(self) -> int | None:
        return len({idx for batch in self.batches()[self._consumed:] for idx, _, padding in batch if not padding})

    def _corrupt_hint(self) -> str:
        return (f"check them with `codetr data inspect {self.info.source}` and replace or remove the unreadable "
                "image files")

    def _items(self, skip: int) -> Iterable[_Item]:
        self.dataset.epoch = self.epoch
        batches = self.batches()[skip:]
        collate_fn = _MapCollate(self.dataset.transform, self.size_divisor, self.pad_to, f"rank {self.rank}")
        return self._dataloader(_MapAdapter(self.dataset), batch_sampler=batches, collate_fn=collate_fn)
