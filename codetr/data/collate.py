"""Samples and batching: :class:`Sample` (one transformed image) and :func:`collate` (-> ``Batch``).

Padding samples
---------------
Evaluation loaders make every rank run the same number of batches (DDP collectives must match). A rank
with fewer images receives *padding samples*: copies of one of its own images (or a blank image) whose
``image_id`` is :data:`PADDING_IMAGE_ID` (``-1``). Real COCO image ids are ``>= 0`` (the converter
enforces it), so consumers drop every prediction whose image id is negative before gathering results::

    for dets, image_id in zip(detections, batch.image_ids):
        if image_id < 0:        # padding sample, see codetr.data.collate
            continue
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from codetr.core.structures import Batch, Target

__all__ = ["Sample", "PADDING_IMAGE_ID", "collate", "is_padding_id"]

#: ``image_id`` of padding samples (dropped from evaluation results).
PADDING_IMAGE_ID = -1


def is_padding_id(image_id: int) -> bool:
    """True for the image id of a padding sample (any negative id)."""
    return image_id < 0


@dataclass
class Sample:
    """One decoded, transformed image with its target.

    Attributes:
        image: (3, h, w) float32 normalised image (after transforms).
        target: boxes xyxy absolute pixels in the frame of ``image``; contiguous labels.
        image_id: COCO image id, or :data:`PADDING_IMAGE_ID` for padding samples.
        orig_size: (h, w) of the original image file (the frame of the annotations on disk).
    """

    image: Tensor
    target: Target
    image_id: int
    orig_size: tuple[int, int]

    @property
    def is_padding(self) -> bool:
        return is_padding_id(self.image_id)

    def as_padding(self) -> "Sample":
        """A copy flagged as padding (same tensors; ``image_id = -1``)."""
        return Sample(self.image, self.target, PADDING_IMAGE_ID, self.orig_size)


def _round_up(x: int, d: int) -> int:
    return (x + d - 1) // d * d


def collate(
    samples: Sequence[Sample], size_divisor: int = 1, pad_to: tuple[int, int] | None = None
) -> Batch:
    """Pad images bottom/right to a common canvas and build a :class:`~codetr.core.structures.Batch`.

    Args:
        samples: transformed samples; images (3, h_i, w_i) float32.
        size_divisor: round the canvas H, W up to a multiple of this (1 = no rounding).
        pad_to: fixed (H, W) canvas (large scale jitter); every image must fit into it.

    Returns:
        ``Batch`` with ``images`` (B, 3, H, W) zero-padded (zero = mean colour after normalisation),
        ``masks`` (B, H, W) True on padding, ``image_sizes`` (B, 2) valid (h_i, w_i), ``orig_sizes``
        (B, 2), ``targets`` and ``image_ids`` in sample order.

    Raises:
        ValueError: empty ``samples``, non-(3, h, w) images, or an image larger than ``pad_to``.
    """
    if not samples:
        raise ValueError("collate() needs at least one sample")
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    for s in samples:
        if s.image.ndim != 3 or s.image.shape[0] != 3:
            raise ValueError(f"image {s.image_id}: expected a (3, h, w) tensor, got {tuple(s.image.shape)}")
    sizes = [(int(s.image.shape[1]), int(s.image.shape[2])) for s in samples]
    H = max(h for h, _ in sizes)
    W = max(w for _, w in sizes)
    if pad_to is not None:
        if H > pad_to[0] or W > pad_to[1]:
            raise ValueError(
                f"an image of the batch is {H}x{W}, larger than the fixed canvas {pad_to[0]}x{pad_to[1]} "
                "(check that the transforms crop to the canvas size)"
            )
        H, W = int(pad_to[0]), int(pad_to[1])
    H, W = _round_up(H, size_divisor), _round_up(W, size_divisor)
    dtype = samples[0].image.dtype
    images = torch.zeros(len(samples), 3, H, W, dtype=dtype)
    masks = torch.ones(len(samples), H, W, dtype=torch.bool)
    for i, (s, (h, w)) in enumerate(zip(samples, sizes)):
        images[i, :, :h, :w] = s.image
        masks[i, :h, :w] = False
    return Batch(
        images=images,
        masks=masks,
        targets=[s.target for s in samples],
        image_sizes=torch.tensor(sizes, dtype=torch.int64),
        orig_sizes=torch.tensor([s.orig_size for s in samples], dtype=torch.int64),
        image_ids=[int(s.image_id) for s in samples],
    )
