"""On-disk format of codetr detection shards (format version 1).

A converted split is a directory with a few webdataset tar shards and one ``index.json``::

    out_dir/
        index.json
        shard-000000.tar
        shard-000001.tar
        ...

Shards
------
Every shard is a plain (uncompressed) POSIX tar file readable by ``webdataset`` and by ``tar``. A
sample is the set of consecutive members sharing one *key* (the file name without its extensions):

* ``<key>.jpg`` / ``<key>.png`` (also ``.webp``, ``.bmp``, ``.tiff``): the **original image bytes**, copied
  untouched from the source file (no re-encoding, so no quality loss and byte-identical round trips).
  The extension is chosen from the file's magic bytes, not from its name.
* ``<key>.json``: the per-image annotations, a :class:`SampleMeta`::

    {
      "image_id": 397133,                 # COCO image id (int >= 0), unique in the split
      "file_name": "000000397133.jpg",    # file name in the source annotation file
      "width": 640, "height": 427,        # size of the ORIGINAL image, pixels
      "boxes": [[x, y, w, h], ...],       # COCO xywh, absolute pixels, already clipped to the image
      "category_ids": [44, 67, ...],      # original COCO category ids
      "labels": [39, 60, ...],            # contiguous labels 0..C-1 (see "Class mapping" below)
      "iscrowd": [0, 1, ...],             # 0/1; crowd boxes are kept (evaluation ignores them)
      "area": [1033.5, 4321.0, ...]       # COCO ``area`` (segmentation area) in original pixels
    }

Keys are sanitised: webdataset treats every ``.`` in a member name as the start of an extension and
keys starting with ``_`` as metadata, so keys are built only from ``[0-9A-Za-z_-]`` and start with the
zero-padded image id (see :func:`make_key`).

Boxes in the shard are COCO **xywh absolute pixels** of the original image. The loader converts them to
the framework convention (xyxy absolute pixels, see :mod:`codetr.core.structures`) when it decodes a
sample. Zero/negative-size boxes never reach a shard (the converter drops and counts them).

Index
-----
``index.json`` (a :class:`DatasetIndex`) lists the shards (file names relative to the index file, with
their sample counts), the total sample count, the categories, the label mapping, the source annotation
file and the counts of the conversion report. Loaders read only this small file up front (no COCO json
per rank), which is what makes exact epoch planning possible (``len()`` is known without reading data).

Class mapping
-------------
Contiguous labels are the categories **sorted by COCO category id**: ``label = rank of category_id in
sorted(ids)``. ``DatasetIndex.label_to_category_id[label]`` gives the COCO id back (needed to write COCO
results). Every category of the annotation file is kept, including ones without annotations, so labels
are stable for a given category list.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DataError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILENAME",
    "IMAGE_EXTENSIONS",
    "SampleMeta",
    "CategoryInfo",
    "ShardInfo",
    "ConversionCounts",
    "DatasetIndex",
    "make_key",
    "sanitize_key",
    "image_extension",
    "category_mapping",
    "load_index",
    "parse_index",
    "save_index",
    "atomic_write_bytes",
    "format_validation_error",
]

FORMAT_NAME = "codetr-detection-shards"
FORMAT_VERSION = 1
INDEX_FILENAME = "index.json"
#: Image member extensions the loader accepts, in order of preference.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "png", "webp", "bmp", "tiff")

_KEY_BAD_CHARS = re.compile(r"[^0-9A-Za-z_-]+")
_MAX_KEY_STEM = 48


class DataError(ValueError):
    """A problem with the user's data (annotation file, image folder, shards, index).

    The message always names the file or field that is wrong and how to fix it.
    """


# ----------------------------------------------------------------------------------------------
# keys and file types
# ----------------------------------------------------------------------------------------------


def sanitize_key(text: str) -> str:
    """Make ``text`` safe as (part of) a webdataset key: no dots, slashes or leading underscores."""
    out = _KEY_BAD_CHARS.sub("_", text).strip("_")
    return out


def make_key(image_id: int, file_name: str) -> str:
    """The shard key of an image: ``<12-digit image id>_<sanitised file stem>``.

    The id prefix makes keys unique within a split (image ids are unique) and sortable; the stem is for
    humans listing a tar. Example: ``(397133, "val2017/000000397133.jpg") -> "000000397133_000000397133"``.
    """
    if image_id < 0:
        raise DataError(f"image id {image_id} is negative; COCO image ids must be >= 0")
    stem = sanitize_key(Path(file_name).stem)[:_MAX_KEY_STEM]
    return f"{image_id:012d}_{stem}" if stem else f"{image_id:012d}"


def image_extension(data: bytes, file_name: str = "") -> str:
    """Shard extension for image bytes, decided by the magic bytes (never by the file name).

    Raises:
        DataError: the bytes are not a JPEG/PNG/WebP/BMP/TIFF image (``file_name`` is named).
    """
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    raise DataError(
        f"{file_name or 'image'}: not a JPEG/PNG/WebP/BMP/TIFF file (first bytes {head[:8]!r}); "
        "re-encode it to JPEG or PNG, or remove it from the annotation file"
    )


# ----------------------------------------------------------------------------------------------
# pydantic models
# ----------------------------------------------------------------------------------------------


class SampleMeta(BaseModel):
    """The ``<key>.json`` member of a sample: annotations of one image (see module docstring).

    ``boxes`` are COCO xywh absolute pixels in the original image, clipped to it, with w, h > 0.
    All per-box lists have the same length N (N may be 0: images without boxes are kept).
    """

    model_config = ConfigDict(extra="forbid")

    image_id: int = Field(ge=0)
    file_name: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list)
    category_ids: list[int] = Field(default_factory=list)
    labels: list[int] = Field(default_factory=list)
    iscrowd: list[Literal[0, 1]] = Field(default_factory=list)
    area: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "SampleMeta":
        n = len(self.boxes)
        for name in ("category_ids", "labels", "iscrowd", "area"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"'{name}' has {len(getattr(self, name))} entries but 'boxes' has {n}")
        tol = 1e-3
        for i, (x, y, w, h) in enumerate(self.boxes):
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise ValueError(f"box {i} has non-finite values {[x, y, w, h]}")
            if w <= 0 or h <= 0:
                raise ValueError(f"box {i} {[x, y, w, h]} (xywh) has zero or negative size")
            if x < -tol or y < -tol or x + w > self.width + tol or y + h > self.height + tol:
                raise ValueError(
                    f"box {i} {[x, y, w, h]} (xywh) is outside the {self.width}x{self.height} image"
                )
        if any(label < 0 for label in self.labels):
            raise ValueError("labels must be >= 0")
        return self

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)


class CategoryInfo(BaseModel):
    """One category; ``DatasetIndex.categories`` lists them in contiguous-label order."""

    model_config = ConfigDict(extra="forbid")

    id: int
    name: str
    supercategory: str | None = None


class ShardInfo(BaseModel):
    """One shard: file name relative to the index file, and how many samples/boxes it holds."""

    model_config = ConfigDict(extra="forbid")

    file: str
    num_samples: int = Field(ge=0)
    num_boxes: int = Field(default=0, ge=0)
    num_bytes: int = Field(default=0, ge=0)


class ConversionCounts(BaseModel):
    """What the converter saw, kept, fixed and dropped (also printed as the conversion report)."""

    model_config = ConfigDict(extra="forbid")

    images: int = 0
    images_written: int = 0
    images_without_boxes: int = 0
    image_sizes_read_from_files: int = 0
    annotations: int = 0
    boxes_written: int = 0
    boxes_clipped: int = 0
    boxes_dropped_degenerate: int = 0
    boxes_dropped_outside: int = 0
    crowd_boxes: int = 0
    categories_without_boxes: list[int] = Field(default_factory=list)


class DatasetIndex(BaseModel):
    """``index.json`` of a converted split (see module docstring)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["codetr-detection-shards"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    num_samples: int = Field(ge=0)
    shards: list[ShardInfo]
    categories: list[CategoryInfo]
    label_to_category_id: list[int]
    source_annotations: str | None = None
    counts: ConversionCounts = Field(default_factory=ConversionCounts)
    created_with: str = ""

    @model_validator(mode="after")
    def _check(self) -> "DatasetIndex":
        total = sum(s.num_samples for s in self.shards)
        if total != self.num_samples:
            raise ValueError(f"num_samples is {self.num_samples} but the shards hold {total} samples")
        ids = [c.id for c in self.categories]
        if self.label_to_category_id != ids:
            raise ValueError("label_to_category_id must equal [c.id for c in categories]")
        if ids != sorted(set(ids)):
            raise ValueError("categories must be sorted by id without duplicates")
        names = [s.file for s in self.shards]
        if len(set(names)) != len(names):
            raise ValueError("shard file names must be unique")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return {cid: label for label, cid in enumerate(self.label_to_category_id)}

    @property
    def shard_sizes(self) -> list[int]:
        return [s.num_samples for s in self.shards]

    def shard_urls(self, root: str | os.PathLike[str]) -> list[str]:
        """Shard paths, resolved relative to ``root`` (the directory holding the index file)."""
        return [s.file if _is_url_or_abs(s.file) else os.path.join(os.fspath(root), s.file) for s in self.shards]


def _is_url_or_abs(name: str) -> bool:
    return os.path.isabs(name) or "://" in name or name.startswith("pipe:")


def category_mapping(categories: Sequence[dict[str, Any]]) -> tuple[list[CategoryInfo], dict[int, int]]:
    """COCO ``categories`` -> (categories sorted by id, ``{category_id: contiguous label}``).

    Raises:
        DataError: a category has no integer ``id`` / no ``name``, or ids are duplicated.
    """
    infos: list[CategoryInfo] = []
    problems: list[str] = []
    for i, cat in enumerate(categories):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool):
            problems.append(f"categories[{i}] has no integer 'id' ({cat!r:.80})")
            continue
        name = cat.get("name", f"class_{cid}")
        sup = cat.get("supercategory")
        infos.append(CategoryInfo(id=cid, name=str(name), supercategory=None if sup is None else str(sup)))
    if problems:
        raise DataError("; ".join(problems[:5]))
    ids = [c.id for c in infos]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise DataError(f"duplicate category ids in 'categories': {dups[:10]}; every category id must be unique")
    infos.sort(key=lambda c: c.id)
    return infos, {c.id: label for label, c in enumerate(infos)}


# ----------------------------------------------------------------------------------------------
# load / save
# ----------------------------------------------------------------------------------------------


def format_validation_error(err: ValidationError, limit: int = 5) -> str:
    """One line per pydantic error: ``field.path: message`` (at most ``limit``)."""
    lines = []
    for e in err.errors()[:limit]:
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"{loc}: {e['msg']}")
    more = len(err.errors()) - limit
    if more > 0:
        lines.append(f"... and {more} more")
    return "; ".join(lines)


def load_index(path: str | os.PathLike[str]) -> tuple[DatasetIndex, Path]:
    """Load ``index.json`` from a file path or from a directory containing it.

    Returns:
        (index, root) where ``root`` is the directory the shard file names are relative to.

    Raises:
        DataError: missing file, invalid JSON, unsupported version or invalid content; the message
            names the path and what is wrong.
    """
    p = Path(path)
    if p.is_dir():
        p = p / INDEX_FILENAME
        if not p.exists():
            raise DataError(
                f"{path}: directory has no {INDEX_FILENAME}; convert a COCO set with "
                "`codetr data convert` or point to shard URLs with an explicit sample count"
            )
    if not p.exists():
        raise DataError(f"{p}: index file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read index file ({exc})") from exc
    return parse_index(text, str(p)), p.parent


def parse_index(text: str | bytes, where: str) -> DatasetIndex:
    """Validate the text of an ``index.json`` (read from ``where``: a path or URL, named in every error).

    Raises:
        DataError: invalid JSON, not a codetr index, unsupported version or invalid content.
    """
    p = where
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: cannot read index file ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise DataError(f"{p}: not a codetr shard index (expected \"format\": \"{FORMAT_NAME}\")")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise DataError(
            f"{p}: format_version {version!r} is not supported by this codetr (reads 1..{FORMAT_VERSION}); "
            "upgrade codetr or re-convert the data"
        )
    try:
        index = DatasetIndex.model_validate(raw)
    except ValidationError as exc:
        raise DataError(f"{p}: invalid index file: {format_validation_error(exc)}") from exc
    return index


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_index(index: DatasetIndex, path: str | os.PathLike[str]) -> Path:
    """Atomically write ``index`` to ``path`` (a file path or a directory -> ``dir/index.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / INDEX_FILENAME
    text = json.dumps(index.model_dump(mode="json"), indent=2) + "\n"
    atomic_write_bytes(p, text.encode("utf-8"))
    return p
