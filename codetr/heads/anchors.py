"""Anchor generation shared by the anchor-based auxiliary heads (ATSS, RPN).

Behaviour matches MMDetection's ``AnchorGenerator`` (v2.25 / v3.x; paraphrased, not copied):

* Base anchors of a level are centred on ``(center_offset * stride, center_offset * stride)``
  (default offset 0: the centre of cell ``(i, j)`` is ``(j * stride, i * stride)``, **not** the cell
  centre). Sizes: ``base = stride`` (``base_sizes`` overrides it), scales
  ``octave_base_scale * 2 ** (k / scales_per_octave)``, ratios ``h / w``; with ``h_r = sqrt(ratio)``,
  ``w_r = 1 / h_r`` the anchor is ``w = base * w_r * scale``, ``h = base * h_r * scale``.
* Order inside a location: **ratio-major, scale-minor** (``a = ratio_idx * num_scales + scale_idx``,
  MMDetection's ``scale_major=True``). Order of a level: row-major over locations ``(y, x)``, all
  anchors of a location consecutive. Levels are concatenated in level order by the callers.
* Valid flags: a location is valid when ``x < min(ceil(W_valid / stride), W_l)`` and
  ``y < min(ceil(H_valid / stride), H_l)``, where ``(H_valid, W_valid)`` is the image's valid size
  (MMDetection uses ``img_meta['pad_shape']`` which, with ``size_divisor=1``, is the image size).

Anchors are absolute xyxy pixels in the network-input frame.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["AnchorGenerator", "anchor_inside_flags", "valid_flags_from_mask"]


class AnchorGenerator:
    """Dense anchors of a feature pyramid (no parameters; a plain object, not an ``nn.Module``).

    Args:
        strides: one stride per level (input pixels per cell).
        octave_base_scale: base scale (anchor side = stride x scale for ratio 1).
        scales_per_octave: number of scales per octave.
        ratios: height / width ratios.
        center_offset: anchor centre offset in units of the stride (MMDetection default 0.0).
        base_sizes: optional per-level base sizes (default: the strides).
    """

    def __init__(self, strides: Sequence[int], octave_base_scale: float = 8.0, scales_per_octave: int = 1,
                 ratios: Sequence[float] = (1.0,), center_offset: float = 0.0,
                 base_sizes: Sequence[float] | None = None):
        if not 0.0 <= center_offset <= 1.0:
            raise ValueError(f"center_offset must be in [0, 1], got {center_offset}")
        if scales_per_octave < 1:
            raise ValueError("scales_per_octave must be >= 1")
        self.strides = [int(s) for s in strides]
        self.base_sizes = [float(b) for b in (base_sizes if base_sizes is not None else self.strides)]
        if len(self.base_sizes) != len(self.strides):
            raise ValueError("base_sizes must have one entry per stride")
        self.octave_base_scale = float(octave_base_scale)
        self.scales_per_octave = int(scales_per_octave)
        self.ratios = [float(r) for r in ratios]
        self.center_offset = float(center_offset)
        self.scales = torch.tensor(
            [self.octave_base_scale * 2 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave)],
            dtype=torch.float32)
        self._base = [self._base_anchors(b) for b in self.base_sizes]

    # ------------------------------------------------------------------ properties
    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per location (same for every level)."""
        return len(self.ratios) * self.scales_per_octave

    def base_anchors(self, level: int) -> Tensor:
        """(A, 4) anchors of one location at the origin of ``level`` (xyxy)."""
        return self._base[level].clone()

    def _base_anchors(self, base_size: float) -> Tensor:
        w = h = base_size
        cx = self.center_offset * w
        cy = self.center_offset * h
        ratios = torch.tensor(self.ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w * w_ratios[:, None] * self.scales[None, :]).reshape(-1)
        hs = (h * h_ratios[:, None] * self.scales[None, :]).reshape(-1)
        return torch.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], dim=-1)

    # ------------------------------------------------------------------ anchors
    def level_anchors(self, level: int, featmap_size: tuple[int, int], device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
        """(H_l * W_l * A, 4) anchors of one level, location-major (row-major y, x), anchor fastest."""
        feat_h, feat_w = int(featmap_size[0]), int(featmap_size[1])
        stride = self.strides[level]
        base = self._base[level].to(device=device, dtype=dtype)
        shift_x = torch.arange(0, feat_w, device=device).to(dtype) * stride
        shift_y = torch.arange(0, feat_h, device=device).to(dtype) * stride
        xx = shift_x.repeat(feat_h)
        yy = shift_y.view(-1, 1).repeat(1, feat_w).view(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (base[None, :, :] + shifts[:, None, :]).view(-1, 4)

    def grid_anchors(self, featmap_sizes: Sequence[tuple[int, int]], device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """One (H_l * W_l * A, 4) tensor per level (shared by all images of a batch)."""
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"got {len(featmap_sizes)} feature maps for {self.num_levels} anchor strides")
        return [self.level_anchors(i, s, device, dtype) for i, s in enumerate(featmap_sizes)]

    __call__ = grid_anchors

    # ------------------------------------------------------------------ valid flags
    def level_valid_flags(self, level: int, featmap_size: tuple[int, int], image_size_hw: Sequence[int] | Tensor,
                          device: torch.device | str | None = None) -> Tensor:
        """(H_l * W_l * A,) bool: anchor location inside the valid image (MMDetection ceil rule)."""
        feat_h, feat_w = int(featmap_size[0]), int(featmap_size[1])
        img_h, img_w = (int(v) for v in (image_size_hw.tolist() if isinstance(image_size_hw, Tensor)
                                         else image_size_hw))
        stride = self.strides[level]
        valid_h = min(int(math.ceil(img_h / stride)), feat_h)
        valid_w = min(int(math.ceil(img_w / stride)), feat_w)
        vx = torch.zeros(feat_w, dtype=torch.bool, device=device)
        vy = torch.zeros(feat_h, dtype=torch.bool, device=device)
        vx[:valid_w] = True
        vy[:valid_h] = True
        valid = vy[:, None] & vx[None, :]
        return valid.reshape(-1, 1).expand(-1, self.num_base_anchors).reshape(-1)

    def valid_flags(self, featmap_sizes: Sequence[tuple[int, int]], image_size_hw: Sequence[int] | Tensor,
                    device: torch.device | str | None = None) -> list[Tensor]:
        """Per-level valid flags of one image (``image_size_hw`` = its valid (h, w))."""
        return [self.level_valid_flags(i, s, image_size_hw, device) for i, s in enumerate(featmap_sizes)]


def valid_flags_from_mask(level_mask: Tensor, num_base_anchors: int = 1) -> Tensor:
    """(H_l, W_l) padding mask (True = padding) of one image -> (H_l * W_l * A,) valid flags.

    Alternative to :meth:`AnchorGenerator.level_valid_flags` for pyramids whose masks come from a
    nearest-neighbour resize of the image mask (not the MMDetection rule; offered for convenience).
    """
    return (~level_mask).reshape(-1, 1).expand(-1, num_base_anchors).reshape(-1)


def anchor_inside_flags(anchors: Tensor, valid_flags: Tensor, image_size_hw: Sequence[int] | Tensor,
                        allowed_border: float = 0) -> Tensor:
    """MMDetection ``anchor_inside_flags``: valid anchors that also lie within ``allowed_border`` pixels
    of the image. ``allowed_border < 0`` disables the border check (returns ``valid_flags``)."""
    if allowed_border < 0:
        return valid_flags
    img_h, img_w = (float(v) for v in (image_size_hw.tolist() if isinstance(image_size_hw, Tensor)
                                       else image_size_hw))
    return (valid_flags
            & (anchors[:, 0] >= -allowed_border)
            & (anchors[:, 1] >= -allowed_border)
            & (anchors[:, 2] < img_w + allowed_border)
            & (anchors[:, 3] < img_h + allowed_border))
