"""The one place where image bytes become pixels: every path (convert, inspect, the shard and COCO-folder
loaders, predict) decodes through :func:`decode_rgb` and so sees the same 8-bit RGB image.

This module imports only PIL and numpy (no torch), so converter worker processes stay light.

Decoding policy (the result is always an ``RGB`` image with 8 bits per channel):

==================  ==========================================================================
stored mode         decoded as
==================  ==========================================================================
``RGB``             as stored
``RGBX``            the padding channel is dropped
``L``               grey replicated to R = G = B
``1`` (bilevel)     0 -> 0, 1 -> 255, replicated to R = G = B
``P``               palette colours (a transparent index keeps its palette colour; see alpha)
``RGBA`` ``LA``     **alpha is dropped**: the stored colour of every pixel is kept, transparent
``PA`` ``RGBa``     pixels included (no compositing on a background). This is what OpenCV, mmcv
``La``              and ``PIL.Image.convert("RGB")`` do, i.e. what the reference Co-DETR
                    pipeline and its checkpoints saw.
``CMYK``            PIL's conversion ``R = (255 - C) * (255 - K) / 255`` (same for G/M, B/Y);
                    an embedded ICC profile is not applied (as for every mode)
``YCbCr``           PIL's JPEG-style YCbCr -> RGB conversion
``I;16`` (+ L/B/N)  grey with ``2**bits - 1`` as white, scaled to 0..255 with rounding
                    (16-bit: ``v / 257``, so 0..65535 maps to 0..255 instead of being clipped to
                    255). ``bits`` is the file's declared depth (TIFF ``BitsPerSample``, e.g. 12),
                    16 when the file does not say.
``I`` (32-bit int)  as ``I;16`` with the declared depth when an unsigned <= 16-bit depth is
                    declared; otherwise (32-bit or signed container) values that all lie in
                    0..65535 are read as 16-bit data (this is how Pillow holds 16-bit grey, e.g.
                    a uint16 array saved through mode ``I``); other values (negative, > 65535)
                    have no defined 8-bit mapping and raise
``F``, others       raise :class:`CorruptSampleError` naming the file and the mode (no defined
                    0..255 range: convert such files to 8- or 16-bit integer images first)
==================  ==========================================================================

16-bit-per-channel colour PNGs are reduced to 8 bits by Pillow itself when it opens them (high byte).
Only the first frame of multi-frame files (GIF, multi-page TIFF) is used.

**EXIF orientation is ignored, everywhere.** COCO annotations (boxes and ``width``/``height``) refer to
the stored pixel grid, and the converter, the loaders, ``inspect`` and ``predict`` all work in that grid:
an image whose EXIF says "rotate 90 degrees" is decoded unrotated, so its boxes stay aligned with it.

Truncated files are errors: the image is fully decoded (``load()``) with
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` forced off for the call, so a cut-off JPEG raises instead of
being padded with grey (``Image.verify()`` alone does not notice truncated JPEG data).
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile

__all__ = [
    "CorruptSampleError",
    "ImageProblem",
    "decode_rgb",
    "load_image_rgb",
    "to_rgb8",
    "check_image",
    "SUPPORTED_MODES",
]


class CorruptSampleError(ValueError):
    """A stored sample cannot be used (bad image bytes, bad json, missing member). Loaders skip these.

    A ``ValueError``, so callers that already treat bad input values as ``ValueError`` (``predict``)
    catch it too.
    """


_DIRECT = ("RGB", "L", "1", "CMYK", "YCbCr")  # PIL's convert("RGB") is exact for these
_ALPHA = ("RGBA", "RGBa", "RGBX", "LA", "La", "PA", "P")  # via RGBA, alpha dropped
_INT16 = ("I;16", "I;16L", "I;16B", "I;16N")
#: Image modes :func:`decode_rgb` accepts.
SUPPORTED_MODES = (*_DIRECT, *_ALPHA, *_INT16, "I")

_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLE_FORMAT = 339


class ImageProblem(NamedTuple):
    """Why an image file cannot be used: ``kind`` is ``"corrupt"`` (undecodable, truncated, unsupported
    mode) or ``"size"`` (decodes, but its size differs from the annotations)."""

    file: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"


def _declared_bits(im: Image.Image) -> int | None:
    """Bits per sample the file declares for unsigned integer data (TIFF tags), else ``None``."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    fmt = tags.get(_TIFF_SAMPLE_FORMAT)
    if fmt is not None and (fmt[0] if isinstance(fmt, tuple) else fmt) != 1:
        return None  # signed samples: only the value range tells
    bits = tags.get(_TIFF_BITS_PER_SAMPLE)
    if bits is None:
        return None
    return int(bits[0] if isinstance(bits, tuple) else bits)


def _grey_to_rgb8(arr: np.ndarray, bits: int, where: str, mode: str) -> Image.Image:
    maxval = (1 << bits) - 1
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > maxval):
        raise CorruptSampleError(
            f"{where}: mode {mode} image has values {int(arr.min())}..{int(arr.max())}, outside its "
            f"{bits}-bit range 0..{maxval}"
        )
    a = arr.astype(np.int64)
    out = (a * 255 + maxval // 2) // maxval  # round(v * 255 / maxval); 16-bit: round(v / 257)
    return Image.fromarray(out.astype(np.uint8), "L").convert("RGB")


def to_rgb8(im: Image.Image, where: str) -> Image.Image:
    """A loaded PIL image of any supported mode -> 8-bit ``RGB`` (policy in the module docstring).

    Raises:
        CorruptSampleError: unsupported mode (message names ``where`` and the mode).
    """
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in _DIRECT:
        return im.convert("RGB")
    if mode in _ALPHA:
        return im.convert("RGBA").convert("RGB")
    if mode in _INT16 or mode == "I":
        declared = _declared_bits(im)
        arr = np.asarray(im)
        if declared is not None and 1 <= declared <= 16:
            bits = declared
        elif mode in _INT16:
            bits = 16
        elif arr.size == 0 or (int(arr.min()) >= 0 and int(arr.max()) <= 0xFFFF):
            bits = 16
        else:
            raise CorruptSampleError(
                f"{where}: mode I (32-bit integer) image has values {int(arr.min())}..{int(arr.max())}; "
                "only 0..65535 (16-bit data) has a defined 8-bit mapping"
            )
        return _grey_to_rgb8(arr, bits, where, mode)
    raise CorruptSampleError(
        f"{where}: unsupported image mode {mode!r} (no defined 8-bit RGB mapping; supported: "
        f"{', '.join(SUPPORTED_MODES)}); convert the file to an 8- or 16-bit integer image"
    )


def decode_rgb(data: bytes, where: str) -> Image.Image:
    """Fully decode image bytes to an 8-bit ``RGB`` PIL image (stored pixel grid, EXIF ignored).

    Raises:
        CorruptSampleError: undecodable or truncated bytes, or an unsupported mode; the message names
            ``where`` (the file or shard member).
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb8(im, where)
    except CorruptSampleError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise CorruptSampleError(f"{where}: cannot decode image (not a format PIL recognises)") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
        raise CorruptSampleError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def load_image_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Read and decode an image file with :func:`decode_rgb` (what ``predict`` should use).

    Raises:
        CorruptSampleError: unreadable file, undecodable/truncated bytes, unsupported mode.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CorruptSampleError(f"{path}: cannot read image file ({exc})") from exc
    return decode_rgb(data, os.fspath(path))


def check_image(data: bytes, where: str, width: int, height: int) -> ImageProblem | None:
    """Decode ``data`` exactly as training will and compare its size with the annotations.

    Returns:
        ``None`` when the image is usable, else the :class:`ImageProblem` (``"corrupt"`` or ``"size"``).
    """
    try:
        image = decode_rgb(data, where)
    except CorruptSampleError as exc:
        detail = str(exc)
        if detail.startswith(f"{where}: "):
            detail = detail[len(where) + 2 :]
        return ImageProblem(where, "corrupt", detail)
    if image.size != (width, height):
        return ImageProblem(
            where, "size", f"annotation json says {width}x{height} (width x height) but the image is "
            f"{image.width}x{image.height}"
        )
    return None
