"""codetr.data: COCO -> webdataset shards, synthetic data, transforms, DDP-safe loaders.

Flow: ``shards -> decode -> transforms -> collate -> Batch`` (see :mod:`codetr.data.loader`).

=====================  =========================================================================
module                 what
=====================  =========================================================================
``format``             on-disk format (shards + ``index.json``), pydantic models, ``DataError``
``coco``               COCO json validation shared by the converter and the folder dataset
``convert``            ``convert_coco``: COCO json + images -> shards (parallel, streaming)
``synth``              ``make_synthetic``: deterministic synthetic shapes dataset (COCO json + images)
``transforms``         detection transforms + ``TransformsConfig`` / ``build_transforms``
``collate``            ``Sample`` and ``collate`` -> ``Batch``
``loader``             ``build_loader`` / ``source_categories`` / ``DataSourceConfig`` (entry point, semantics)
``shards``             shard resolution (``resolve_shards``, ``DatasetInfo``) and epoch planning (``plan_epoch``)
``loader_base``        ``LoaderOptions`` (options shared by the loaders) and the ``DetectionLoader`` base
``stream``             ``ShardLoader``: streaming loader over webdataset shards
``coco_folder``        ``CocoFolderDataset`` / ``CocoFolderLoader``: a COCO json + image folder, map-style
``tables``             rich key/value tables shared by the convert report and ``inspect``
``inspect``            shard statistics and rendered samples
``cli``                ``codetr data convert|synth|inspect``
=====================  =========================================================================

Attributes are imported lazily so that light consumers (e.g. converter worker processes) do not
import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

try:
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("codetr")
    except PackageNotFoundError:  # running from a source tree
        __version__ = "0+unknown"
except ImportError:  # pragma: no cover
    __version__ = "0+unknown"

_EXPORTS: dict[str, str] = {
    # format
    "DataError": "format",
    "DatasetIndex": "format",
    "SampleMeta": "format",
    "CategoryInfo": "format",
    "ShardInfo": "format",
    "ConversionCounts": "format",
    "load_index": "format",
    "save_index": "format",
    "INDEX_FILENAME": "format",
    "FORMAT_VERSION": "format",
    # coco / convert / synth
    "prepare_coco": "coco",
    "convert_coco": "convert",
    "ConversionReport": "convert",
    "make_synthetic": "synth",
    "make_synthetic_splits": "synth",
    "SYNTH_CATEGORIES": "synth",
    # transforms
    "TransformsConfig": "transforms",
    "build_transforms": "transforms",
    "TransformPipeline": "transforms",
    # collate
    "Sample": "collate",
    "collate": "collate",
    "PADDING_IMAGE_ID": "collate",
    # loaders
    "DataSourceConfig": "loader",
    "CocoSourceConfig": "loader",
    "build_loader": "loader",
    "source_categories": "loader",
    "LoaderOptions": "loader_base",
    "DetectionLoader": "loader_base",
    "ShardLoader": "stream",
    "CocoFolderDataset": "coco_folder",
    "CocoFolderLoader": "coco_folder",
    "DatasetInfo": "shards",
    "ShardSet": "shards",
    "EpochPlan": "shards",
    "WorkerPlan": "shards",
    "resolve_rank_world": "shards",
    "resolve_shards": "shards",
    "plan_epoch": "shards",
    # inspect
    "inspect_shards": "inspect",
    "render_samples": "inspect",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'codetr.data' has no attribute {name!r}")
    value = getattr(import_module(f"codetr.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
