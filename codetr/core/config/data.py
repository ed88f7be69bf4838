"""Recipe schema of the data sections (``data.train`` / ``data.val``): where a split comes from, how it is
batched and augmented. Pure pydantic, no I/O: :mod:`codetr.data` builds loaders and transforms from these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TransformsConfig", "CocoSourceConfig", "DataSourceConfig"]

#: ImageNet mean / std in 0-255 RGB units (inputs are 0-255, outputs are normalised float32).
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

_DETR_SCALES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]


class TransformsConfig(BaseModel):
    """Augmentation recipe (see :mod:`codetr.data.transforms` for what each ``kind`` does).

    Sizes are pixels. ``scales`` / ``eval_size`` are short-side lengths; ``max_size`` caps the long side.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["detr", "lsj", "resize", "none"] = "detr"
    scales: list[int] = Field(default_factory=lambda: list(_DETR_SCALES))
    max_size: int = Field(default=1333, gt=0)
    crop_resize_scales: list[int] = Field(default_factory=lambda: [400, 500, 600])
    crop_size: tuple[int, int] = (384, 600)
    eval_size: int = Field(default=800, gt=0)
    lsj_image_size: int = Field(default=1024, gt=0)
    lsj_scale_range: tuple[float, float] = (0.1, 2.0)
    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("scales", "crop_resize_scales")
    @classmethod
    def _positive_list(cls, v: list[int]) -> list[int]:
        if not v or any(s <= 0 for s in v):
            raise ValueError("must be a non-empty list of positive sizes")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("std values must be > 0")
        return v

    @model_validator(mode="after")
    def _check(self) -> "TransformsConfig":
        lo, hi = self.crop_size
        if not 0 < lo <= hi:
            raise ValueError(f"crop_size must be (min, max) with 0 < min <= max, got {self.crop_size}")
        slo, shi = self.lsj_scale_range
        if not 0 < slo <= shi:
            raise ValueError(f"lsj_scale_range must be (lo, hi) with 0 < lo <= hi, got {self.lsj_scale_range}")
        return self



class CocoSourceConfig(BaseModel):
    """A COCO annotation file and the folder its ``file_name`` entries are relative to."""

    model_config = ConfigDict(extra="forbid")

    ann_file: Path
    images_dir: Path


class DataSourceConfig(BaseModel):
    """Where one split comes from and how it is batched. Exactly one of ``shards``/``index``/``coco``.

    Attributes:
        shards: shard URL(s) or brace pattern(s) (anything webdataset opens).
        num_samples: total samples of ``shards`` (required unless an index.json sits next to them).
        index: ``index.json`` or the directory holding it (output of ``codetr data convert``).
        coco: annotation json + image folder, read directly (small sets, tests).
        batch_size: images per batch per rank.
        num_workers: loader processes per rank (0 = main process).
        shuffle_buffer: training shuffle buffer in samples (streaming sources; 0 disables). It holds
            raw samples, so it costs about ``shuffle_buffer x average image file size`` of RAM per worker
            (~160 MB for COCO at 1000).
        prefetch_factor: batches prefetched per worker.
        size_divisor: pad batch canvases to a multiple of this.
        transforms: augmentation recipe (train and eval pipelines are derived from it).
        retries / retry_backoff_s / fetch_timeout_s: remote (``http(s)://``, ``pipe:``) shards are fetched
            whole, retried with exponential back-off, then reported with their URL (:mod:`codetr.data.remote`).
    """

    model_config = ConfigDict(extra="forbid")

    shards: str | list[str] | None = None
    num_samples: int | None = Field(default=None, gt=0)
    index: Path | None = None
    coco: CocoSourceConfig | None = None
    batch_size: int = Field(default=2, gt=0)
    num_workers: int = Field(default=2, ge=0)
    shuffle_buffer: int = Field(default=1000, ge=0)
    prefetch_factor: int = Field(default=2, gt=0)
    size_divisor: int = Field(default=1, ge=1)
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    retries: int = Field(default=3, ge=0, description="http(s):// and pipe: shards: retries after a failed fetch")
    retry_backoff_s: float = Field(default=0.5, ge=0, description="first retry delay, doubled each time (max 30 s)")
    fetch_timeout_s: float = Field(default=60.0, gt=0, description="time-out of one remote shard fetch")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSourceConfig":
        given = [name for name in ("shards", "index", "coco") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of 'shards', 'index' or 'coco' must be set"
                + (f" (got {', '.join(repr(g) for g in given)})" if given else " (got none)")
            )
        if self.num_samples is not None and self.shards is None:
            raise ValueError("'num_samples' only applies to 'shards' (index/coco sources know their size)")
        if isinstance(self.shards, list) and not self.shards:
            raise ValueError("'shards' is an empty list")
        return self
