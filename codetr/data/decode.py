"""Turn stored samples (shard members or image files + annotations) into :class:`~codetr.data.collate.Sample`.

The conversion from the on-disk convention (COCO xywh absolute pixels, see :mod:`codetr.data.format`) to
the framework convention (``Target.boxes`` xyxy absolute pixels, :mod:`codetr.core.structures`) happens
here and only here. Image bytes are decoded by :func:`codetr.data.images.decode_rgb` (re-exported here
with :func:`load_image_rgb`): the decoding policy per image mode, the EXIF choice (ignored: annotations
refer to the stored pixel grid) and truncation handling are documented in :mod:`codetr.data.images`.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import torch
from PIL import Image
from pydantic import ValidationError

from codetr.core.structures import Target
from codetr.data.collate import Sample
from codetr.data.format import DataError, SampleMeta, format_validation_error
from codetr.data.images import CorruptSampleError, decode_rgb, load_image_rgb, to_rgb8
from codetr.data.transforms import Transform

__all__ = [
    "CorruptSampleError",
    "meta_to_target",
    "decode_image",
    "decode_rgb",
    "load_image_rgb",
    "to_rgb8",
    "parse_shard_sample",
    "make_sample",
    "blank_sample",
]

#: Member extensions accepted as the image of a shard sample (writer uses the first five).
_IMAGE_KEYS = ("jpg", "png", "webp", "bmp", "tiff", "jpeg", "tif")


def meta_to_target(meta: SampleMeta) -> Target:
    """Annotations of one image -> ``Target`` (boxes xywh -> xyxy absolute pixels, original frame)."""
    n = len(meta.boxes)
    if n == 0:
        t = Target.empty()
        return Target(boxes=t.boxes, labels=t.labels, iscrowd=t.iscrowd, area=torch.zeros(0, dtype=torch.float32))
    xywh = torch.tensor(meta.boxes, dtype=torch.float32)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    return Target(
        boxes=boxes,
        labels=torch.tensor(meta.labels, dtype=torch.int64),
        iscrowd=torch.tensor(meta.iscrowd, dtype=torch.bool),
        area=torch.tensor(meta.area, dtype=torch.float32),
    )


def decode_image(data: bytes, meta: SampleMeta, where: str) -> Image.Image:
    """Decode image bytes to an 8-bit RGB PIL image and check its size against the annotations.

    Decoding is :func:`codetr.data.images.decode_rgb` (every mode, see :mod:`codetr.data.images`).
    EXIF orientation is deliberately ignored (COCO annotations refer to the stored pixel grid).

    Raises:
        CorruptSampleError: undecodable/truncated bytes, unsupported mode, or size different from
            ``meta.width x height``.
    """
    image = decode_rgb(data, where)
    if image.size != (meta.width, meta.height):
        raise CorruptSampleError(
            f"{where}: image is {image.width}x{image.height} but its annotations say {meta.width}x{meta.height}"
        )
    return image


def parse_shard_sample(raw: Mapping[str, Any]) -> tuple[SampleMeta, bytes]:
    """A raw webdataset sample (``{'__key__', 'json', 'jpg'|'png'|...}``) -> (meta, image bytes).

    Raises:
        CorruptSampleError: missing json or image member, invalid json / annotations.
    """
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    js = raw.get("json")
    if js is None:
        raise CorruptSampleError(f"{where}: sample has no .json member (members: {sorted(k for k in raw if not k.startswith('__'))})")
    data = next((raw[k] for k in _IMAGE_KEYS if k in raw), None)
    if data is None:
        raise CorruptSampleError(f"{where}: sample has no image member (.jpg/.png/...)")
    try:
        meta = SampleMeta.model_validate_json(js)
    except ValidationError as exc:
        raise CorruptSampleError(f"{where}: invalid annotations: {format_validation_error(exc)}") from exc
    return meta, data


def make_sample(
    image: Image.Image,
    meta: SampleMeta,
    transform: Transform,
    rng: random.Random,
    num_classes: int | None = None,
    where: str = "",
) -> Sample:
    """Apply ``transform`` to (image, target) and wrap the result in a :class:`Sample`.

    Raises:
        DataError: a label is outside ``[0, num_classes)`` (the shards do not match their index; this
            is a configuration error, not a corrupt sample, so it is not skipped).
    """
    if num_classes is not None and meta.labels and max(meta.labels) >= num_classes:
        raise DataError(
            f"{where}: label {max(meta.labels)} >= num_classes {num_classes}; the shards do not match "
            "their index.json categories (re-convert the data)"
        )
    tensor, target = transform(image, meta_to_target(meta), rng)
    return Sample(image=tensor, target=target, image_id=meta.image_id, orig_size=(meta.height, meta.width))


def blank_sample(transform: Transform, size: int = 64) -> Sample:
    """A gray ``size x size`` padding sample without boxes (used when no real image is at hand)."""
    meta = SampleMeta(image_id=0, file_name="<padding>", width=size, height=size)
    image = Image.new("RGB", (size, size), (124, 116, 104))
    sample = make_sample(image, meta, transform, random.Random(0))
    return sample.as_padding()
