"""Loaders that turn shards (or a COCO folder) into :class:`~codetr.core.structures.Batch` es, DDP-safe.

Entry point: :func:`build_loader` (``DataSourceConfig`` + split -> :class:`DetectionLoader`). Iterating a
loader yields ``Batch`` objects; ``len(loader)`` is exact and identical on every rank. This module owns
the builder (and :func:`source_categories`); the machinery lives in:

===============  ================================================================================
module           what
===============  ================================================================================
``shards``       shard resolution (``resolve_shards``, ``DatasetInfo``), epoch planning (``plan_epoch``)
``loader_base``  ``LoaderOptions`` (options shared by the loaders) and the ``DetectionLoader`` base
``stream``       ``ShardLoader`` and the worker-side streaming dataset it drives
``coco_folder``  ``CocoFolderDataset`` / ``CocoFolderLoader`` (the map-style ``coco`` source)
===============  ================================================================================

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
  with a ``RuntimeWarning`` naming the shard and key (or the image file), issued in the main process
  whatever ``num_workers`` is, and counted: :meth:`DetectionLoader.skip_report` (a
  :class:`~codetr.data.loader_base.SkipReport`: the epoch's count, the total and the first few
  offending samples; also :attr:`~DetectionLoader.num_skipped`, :attr:`~DetectionLoader.num_skipped_epoch`,
  :attr:`~DetectionLoader.skipped_examples`). The data layer prints nothing; the trainer reads the report
  at the end of each epoch. Skipping never crashes the run, but when *nothing* is usable -- every
  shard / image a training worker reads, or everything a rank reads in an epoch, is corrupt -- the loader
  raises :class:`~codetr.data.format.DataError` (source, first offending files, how to check and fix
  them) instead of spinning or training on blank padding. Errors raised inside DataLoader workers
  (:class:`~codetr.data.format.DataError`) are handed to the main process as data and raised there with
  their own message, exactly as with ``num_workers=0``.

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

from pathlib import Path
from typing import Any

from codetr.core.config.data import CocoSourceConfig, DataSourceConfig
from codetr.data.coco_folder import CocoFolderDataset, CocoFolderLoader
from codetr.data.format import DataError
from codetr.data.loader_base import DetectionLoader, LoaderOptions
from codetr.data.remote import RemoteOptions
from codetr.data.shards import resolve_shards
from codetr.data.stream import ShardLoader
from codetr.data.transforms import TransformPipeline, build_transforms

__all__ = [
    "CocoSourceConfig",
    "DataSourceConfig",
    "build_loader",
    "source_categories",
]


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
        ``load_state_dict``, ``skip_report()`` (corrupt samples skipped per epoch and in total).
    """
    if not isinstance(cfg, DataSourceConfig):
        cfg = DataSourceConfig.model_validate(cfg)
    is_train = (split == "train") if train is None else bool(train)
    transform: TransformPipeline = build_transforms(cfg.transforms, is_train)
    options = LoaderOptions(
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
        remote=RemoteOptions(cfg.retries, cfg.retry_backoff_s, cfg.fetch_timeout_s),
    )
    if cfg.coco is not None:
        dataset = CocoFolderDataset(cfg.coco.ann_file, cfg.coco.images_dir, transform, seed=seed)
        return CocoFolderLoader(dataset, options)
    source: Any = cfg.index if cfg.index is not None else cfg.shards
    return ShardLoader(
        source,
        options,
        transform=transform,
        shuffle_buffer=cfg.shuffle_buffer,
        num_samples=cfg.num_samples,
    )
