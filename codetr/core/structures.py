"""Data structures shared by every part of codetr, and the one place box formats are converted.

Coordinate conventions (used everywhere, stated once here):

* ``Target.boxes`` and ``Detections.boxes`` are **xyxy in absolute pixels**. For a target inside a
  :class:`Batch` the frame is the *transformed* image (after resize/crop/flip), origin at the top-left
  corner of the image, which is also the top-left corner of the padded canvas.
* ``Detections`` returned by a detector's ``predict`` are in the **original image frame** (the frame of
  the file on disk) so they can be written to COCO results directly.
* Variants work internally on **normalised cxcywh** relative to the valid (unpadded) image size
  ``Batch.image_sizes``; :func:`normalize_boxes` / :func:`denormalize_boxes` are the only converters.
* Labels are contiguous class indices ``0..num_classes-1``. Wherever a one-to-many target carries
  negatives, the background label is ``num_classes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert

__all__ = [
    "Target",
    "Batch",
    "Detections",
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
    "normalize_boxes",
    "denormalize_boxes",
    "resize_mask",
    "level_masks",
]


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh, same units."""
    return box_convert(boxes, "xyxy", "cxcywh")


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy, same units."""
    return box_convert(boxes, "cxcywh", "xyxy")


def _scale(size_hw: Tensor) -> Tensor:
    """(..., 2) (h, w) -> (..., 4) (w, h, w, h) float scale factors."""
    h, w = size_hw.unbind(-1)
    return torch.stack([w, h, w, h], dim=-1).to(torch.float32)


def normalize_boxes(boxes_xyxy: Tensor, size_hw: Tensor) -> Tensor:
    """Absolute xyxy pixels (N, 4) -> normalised cxcywh in [0, 1] relative to ``size_hw`` (2,) = (h, w)."""
    return xyxy_to_cxcywh(boxes_xyxy) / _scale(size_hw).to(boxes_xyxy)


def denormalize_boxes(boxes_cxcywh: Tensor, size_hw: Tensor) -> Tensor:
    """Normalised cxcywh (..., 4) -> absolute xyxy pixels; ``size_hw`` is (2,) or broadcastable (..., 2)."""
    return cxcywh_to_xyxy(boxes_cxcywh * _scale(size_hw).to(boxes_cxcywh))


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Padding mask (B, H, W) bool, True on padding -> (B, h, w) bool (nearest resize, as official)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


def level_masks(mask: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Padding mask (B, H, W) True on padding -> one mask per level (B, H_l, W_l) (see :func:`resize_mask`)."""
    return [resize_mask(mask, s) for s in shapes]


@dataclass
class Target:
    """Ground truth of one image.

    Attributes:
        boxes: (N, 4) float32, xyxy absolute pixels in the frame of the image it belongs to.
        labels: (N,) int64 contiguous class indices in ``[0, num_classes)``.
        iscrowd: (N,) bool; crowd boxes are kept for evaluation and ignored by training losses.
        area: (N,) float32 COCO ``area`` of each annotation in *original* pixels (used by evaluation
            for the small/medium/large ranges); optional, ``None`` means "use box area".
    """

    boxes: Tensor
    labels: Tensor
    iscrowd: Tensor
    area: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"Target.boxes must be (N, 4), got {tuple(self.boxes.shape)}")
        for name in ("labels", "iscrowd", "area"):
            t = getattr(self, name)
            if t is not None and t.shape != (n,):
                raise ValueError(f"Target.{name} must be ({n},), got {tuple(t.shape)}")

    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> "Target":
        return cls(
            boxes=torch.zeros(0, 4, device=device),
            labels=torch.zeros(0, dtype=torch.int64, device=device),
            iscrowd=torch.zeros(0, dtype=torch.bool, device=device),
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> "Target":
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def non_crowd(self) -> "Target":
        """The subset used by training losses (crowd annotations removed)."""
        keep = ~self.iscrowd
        return Target(
            boxes=self.boxes[keep],
            labels=self.labels[keep],
            iscrowd=self.iscrowd[keep],
            area=None if self.area is None else self.area[keep],
        )


@dataclass
class Batch:
    """A padded batch of images with their targets.

    Attributes:
        images: (B, 3, H, W) float32, normalised, zero-padded on the bottom/right to a common size.
        masks: (B, H, W) bool, **True on padding** (invalid pixels), False on the image.
        targets: B targets, boxes in the transformed frame of each image.
        image_sizes: (B, 2) int64 valid (h, w) of each image inside the canvas after transforms.
        orig_sizes: (B, 2) int64 (h, w) of the original image files (frame of the annotations on disk).
        image_ids: B COCO image ids (int).
    """

    images: Tensor
    masks: Tensor
    targets: list[Target]
    image_sizes: Tensor
    orig_sizes: Tensor
    image_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            masks=self.masks.to(device, non_blocking=non_blocking),
            targets=[t.to(device) for t in self.targets],
            image_sizes=self.image_sizes.to(device),
            orig_sizes=self.orig_sizes.to(device),
            image_ids=list(self.image_ids),
        )


@dataclass
class Detections:
    """Detections of one image.

    Attributes:
        boxes: (K, 4) float32 xyxy absolute pixels in the **original** image frame.
        scores: (K,) float32 in [0, 1].
        labels: (K,) int64 contiguous class indices.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))

    def filter(self, keep: Tensor) -> "Detections":
        """Subset by a boolean mask or index tensor."""
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


def _to(t: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if t is None else t.to(device)
