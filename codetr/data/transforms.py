"""Detection transforms on ``(image, Target)`` pairs that keep boxes consistent with the pixels.

Images are ``PIL.Image`` (RGB) or ``uint8`` tensors ``(3, h, w)`` until :class:`ToNormalizedTensor`, which
returns a ``float32`` tensor ``(3, h, w)`` normalised with ImageNet statistics given in 0-255 RGB units.
Targets are :class:`codetr.core.structures.Target`: ``boxes`` (N, 4) xyxy absolute pixels of the *current*
image, ``labels``, ``iscrowd``, ``area``. Every geometric transform updates the boxes; transforms that
remove boxes (crops) drop ``labels``/``iscrowd``/``area`` with the same mask, so all fields stay aligned.
``area`` is the COCO area in **original** pixels (used by evaluation size ranges) and is never rescaled.

Randomness: every transform takes the ``rng: random.Random`` passed to ``__call__`` and never touches the
global RNGs, so a pipeline is reproducible from a seed. The loaders seed one ``random.Random`` per
sample from ``(seed, epoch, image key)``, which makes augmentation independent of the number of
workers/ranks.

Recipes (see :func:`build_transforms` / :class:`TransformsConfig`):

* ``detr`` (DETR / Deformable-DETR / DINO multi-scale): flip; then 50/50 either resize the short side to
  a random value of ``scales`` (long side <= ``max_size``), or resize the short side to one of
  ``crop_resize_scales`` -> random crop with sides in ``crop_size`` -> resize the short side to
  ``scales``. Eval: short side ``eval_size``, long side <= ``max_size``.
* ``lsj`` (large scale jitter, Co-DINO LSJ recipes): resize so the image fits into
  ``lsj_image_size * r`` (r uniform in ``lsj_scale_range``), random crop to at most ``lsj_image_size``,
  flip. The image is **not** padded here: the pipeline exposes ``canvas_size`` and the loader pads every
  image of the batch to that fixed canvas in :func:`codetr.data.collate.collate` (padding is marked in
  ``Batch.masks`` and excluded from ``image_sizes``, so predictions can be mapped back to the original
  image). Eval: fit into ``lsj_image_size`` (long side = image size), same canvas.
* ``resize``: flip + random short-side resize, no crop. Eval as ``detr``.
* ``none``: no geometric change (train and eval), only normalisation.
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch import Tensor

from codetr.core.config.data import IMAGENET_MEAN, IMAGENET_STD, TransformsConfig
from codetr.core.structures import Target

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLike",
    "Transform",
    "Compose",
    "RandomHorizontalFlip",
    "RandomResize",
    "Resize",
    "ResizeToFit",
    "RandomSizeCrop",
    "RandomSelect",
    "LargeScaleJitter",
    "ToNormalizedTensor",
    "TransformPipeline",
    "TransformsConfig",
    "build_transforms",
    "image_size_hw",
    "denormalize_image",
    "sample_rng",
]

ImageLike = Union[Image.Image, Tensor]


class Transform(Protocol):
    """``(image, target, rng) -> (image, target)``; must use only ``rng`` for randomness."""

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[ImageLike, Target]: ...


def image_size_hw(image: ImageLike) -> tuple[int, int]:
    """(h, w) of a PIL image or a (C, h, w) tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def _replace_boxes(target: Target, boxes: Tensor, keep: Tensor | None = None) -> Target:
    if keep is None:
        return Target(boxes=boxes, labels=target.labels, iscrowd=target.iscrowd, area=target.area)
    return Target(
        boxes=boxes[keep],
        labels=target.labels[keep],
        iscrowd=target.iscrowd[keep],
        area=None if target.area is None else target.area[keep],
    )


def _resize(image: ImageLike, target: Target, out_hw: tuple[int, int]) -> tuple[ImageLike, Target]:
    h, w = image_size_hw(image)
    oh, ow = max(1, int(out_hw[0])), max(1, int(out_hw[1]))
    if (oh, ow) == (h, w):
        return image, target
    if isinstance(image, Image.Image):
        image = image.resize((ow, oh), Image.BILINEAR)
    else:
        image = F.resize(image, [oh, ow], antialias=True)
    scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=target.boxes.dtype)
    return image, _replace_boxes(target, target.boxes * scale)


def _crop(image: ImageLike, target: Target, top: int, left: int, height: int, width: int) -> tuple[ImageLike, Target]:
    """Crop and keep the boxes that still have a positive area inside the crop (clipped to it)."""
    image = F.crop(image, top, left, height, width)
    boxes = target.boxes - torch.tensor([left, top, left, top], dtype=target.boxes.dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, _replace_boxes(target, boxes, keep)


def _round(x: float) -> int:
    """Round half up (like mmcv's rescale), not Python's round-half-to-even."""
    return int(x + 0.5)


def _short_side_hw(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) with the short side = ``size`` unless the long side would exceed ``max_size``."""
    scale = size / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, _round(h * scale)), max(1, _round(w * scale))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[ImageLike, Target]:
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Flip left-right with probability ``p``; x-coordinates become ``w - x``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[ImageLike, Target]:
        if rng.random() >= self.p:
            return image, target
        _, w = image_size_hw(image)
        image = image.transpose(Image.FLIP_LEFT_RIGHT) if isinstance(image, Image.Image) else F.hflip(image)
        b = target.boxes
        boxes = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=-1)
        return image, _replace_boxes(target, boxes)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the short side to a size drawn from ``sizes`` (long side capped at ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[ImageLike, Target]:
        size = self.sizes[0] if len(self.sizes) == 1 else rng.choice(self.sizes)
        h, w = image_size_hw(image)
        return _resize(image, target, _short_side_hw(h, w, size, self.max_size))

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class Resize(RandomResize):
    """Deterministic eval resize: short side ``size`` (default 800), long side <= ``max_size`` (1333)."""

    def __init__(self, size: int = 800, max_size: int | None = 1333):
        super().__init__([size], max_size)

    def __repr__(self) -> str:
        return f"Resize(size={self.sizes[0]}, max_size={self.max_size})"


class ResizeToFit:
    """Resize keeping the aspect ratio so the image fits into ``(height, width)`` (one side touches)."""

    def __init__(self, size_hw: tuple[int, int]):
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[ImageLike, Target]:
        h, w = image_size_hw(image)
        scale = min(self.size_hw[0] / h, self.size_hw[1] / w)
        out = (min(self.size_hw[0], max(1, _round(h * scale))), min(self.size_hw[1], max(1, _round(w * scale))))
        return _resize(image, target, out)

    def __repr__(self) -> str:
        return f"ResizeToFit(size_hw={self.size_hw})"


class RandomSizeCrop:
    """Random crop whose width/height are drawn uniformly in ``[min_size, max_size]`` (capped by the image).

    Boxes are shifted and clipped to the crop; boxes left with zero area are dropped (with their labels,
    iscrowd and area).
    """

    def __init__(self, min_size: int, max_size: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[ImageLike, Target]:
        h, w = image_size_hw(image)
        cw = rng.randint(min(self.min_size, w), min(w, self.max_size))
        ch = rng.randint(min(self.min_size, h), min(h, self.max_size))
        top = rng.randint(0, h - ch)
        left = rng.randint(0, w - cw)
        return _crop(image, target, top, left, ch, cw)

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """Apply ``a`` with probability ``p``, otherwise ``b``."""

    def __init__(self, a: Transform, b: Transform, p: float = 0.5):
        self.a, self.b, self.p = a, b, p

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[ImageLike, Target]:
        return self.a(image, target, rng) if rng.random() < self.p else self.b(image, target, rng)

    def __repr__(self) -> str:
        return f"RandomSelect({self.a!r}, {self.b!r}, p={self.p})"


class LargeScaleJitter:
    """Large scale jitter (resize by a random factor of a target size, then random crop to it).

    The image is resized keeping its aspect ratio so that it fits into ``image_size * r`` with ``r``
    uniform in ``scale_range``, then a random window of at most ``image_size`` is cropped; boxes are clipped
    and those with zero area after the crop dropped. The result is at most ``image_size`` in both sides;
    the fixed canvas (padding to ``image_size``) is applied by collate, see :attr:`canvas_size`.
    """

    def __init__(self, image_size: int | tuple[int, int] = 1024, scale_range: tuple[float, float] = (0.1, 2.0)):
        self.canvas_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"LargeScaleJitter scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.scale_range = (float(lo), float(hi))

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[ImageLike, Target]:
        th, tw = self.canvas_size
        r = rng.uniform(*self.scale_range)
        h, w = image_size_hw(image)
        scale = min(th * r / h, tw * r / w)
        image, target = _resize(image, target, (max(1, _round(h * scale)), max(1, _round(w * scale))))
        h, w = image_size_hw(image)
        ch, cw = min(h, th), min(w, tw)
        if (ch, cw) != (h, w):
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            image, target = _crop(image, target, top, left, ch, cw)
        return image, target

    def __repr__(self) -> str:
        return f"LargeScaleJitter(image_size={self.canvas_size}, scale_range={self.scale_range})"


class ToNormalizedTensor:
    """PIL / uint8 tensor -> float32 (3, h, w) tensor ``(x - mean) / std`` with 0-255 RGB statistics."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[Tensor, Target]:
        if isinstance(image, Image.Image):
            arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
            tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        else:
            tensor = image
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"expected an RGB image (3, h, w), got shape {tuple(tensor.shape)}")
        out = (tensor.to(torch.float32) - self.mean) / self.std
        return out.contiguous(), target

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def denormalize_image(image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Inverse of :class:`ToNormalizedTensor`: float (3, h, w) -> uint8 (3, h, w)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.float() * s + m).round().clamp(0, 255).to(torch.uint8)


class TransformPipeline:
    """A built pipeline: geometric/photometric part + normalisation.

    Attributes:
        geometric: the transform applied before normalisation (use it alone to visualise augmentation).
        canvas_size: fixed (h, w) canvas every batch must be padded to (LSJ), else ``None``.
    """

    def __init__(self, geometric: Transform, normalize: ToNormalizedTensor, canvas_size: tuple[int, int] | None = None):
        self.geometric = geometric
        self.normalize = normalize
        self.canvas_size = canvas_size

    def __call__(self, image: ImageLike, target: Target, rng: random.Random) -> tuple[Tensor, Target]:
        image, target = self.geometric(image, target, rng)
        return self.normalize(image, target, rng)

    def __repr__(self) -> str:
        return f"TransformPipeline({self.geometric!r}, canvas_size={self.canvas_size})"


def build_transforms(spec: TransformsConfig | dict | None, train: bool) -> TransformPipeline:
    """Build the train or eval pipeline of a :class:`TransformsConfig` (dicts are validated first).

    Returns:
        A :class:`TransformPipeline` mapping ``(PIL image | uint8 (3,h,w), Target, rng)`` to
        ``(float32 (3,h',w') normalised, Target in the new frame)``; ``canvas_size`` is set for ``lsj``.
    """
    cfg = spec if isinstance(spec, TransformsConfig) else TransformsConfig.model_validate(spec or {})
    norm = ToNormalizedTensor(cfg.mean, cfg.std)
    canvas: tuple[int, int] | None = None
    steps: list[Transform] = []
    if cfg.kind == "none":
        pass
    elif cfg.kind == "lsj":
        canvas = (cfg.lsj_image_size, cfg.lsj_image_size)
        if train:
            steps = [LargeScaleJitter(cfg.lsj_image_size, cfg.lsj_scale_range)]
            if cfg.flip_prob > 0:
                steps.append(RandomHorizontalFlip(cfg.flip_prob))
        else:
            steps = [ResizeToFit(canvas)]
    elif not train:
        steps = [Resize(cfg.eval_size, cfg.max_size)]
    elif cfg.kind == "resize":
        steps = [RandomResize(cfg.scales, cfg.max_size)]
        if cfg.flip_prob > 0:
            steps.insert(0, RandomHorizontalFlip(cfg.flip_prob))
    else:  # detr
        steps = [
            RandomSelect(
                RandomResize(cfg.scales, cfg.max_size),
                Compose(
                    [
                        RandomResize(cfg.crop_resize_scales),
                        RandomSizeCrop(*cfg.crop_size),
                        RandomResize(cfg.scales, cfg.max_size),
                    ]
                ),
            )
        ]
        if cfg.flip_prob > 0:
            steps.insert(0, RandomHorizontalFlip(cfg.flip_prob))
    return TransformPipeline(Compose(steps), norm, canvas)


def sample_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from ``parts`` (e.g. seed, epoch, key); stable across processes."""
    return random.Random("/".join(str(p) for p in parts))

