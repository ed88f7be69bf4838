"""Adapters from the encoder output to the auxiliary heads' :class:`FeaturePyramid` (paper §3.2).

* :class:`MultiScaleAdapter` (official Co-DETR, released): the encoder memory split back into its
  levels (``Memory.levels()``), plus ``num_extra`` coarser levels; the first extra level is
  ``downsample = Conv3x3 s2 p1 (bias) + GroupNorm`` (no activation) applied to the last memory level,
  further ones apply their own conv + GN to the previous extra level. Module names match the official
  ``query_head.downsample.0`` (conv) / ``query_head.downsample.1`` (GN) keys
  (:func:`official_adapter_key_map`).
* :class:`SingleScaleAdapter` (paper §A2, not released officially; our design): from one stride-``s``
  map, ``num_up`` finer levels (bilinear x2 upsample + Conv3x3 + GN, chained) and ``num_down`` coarser
  levels (Conv3x3 s2 + GN, chained), ViTDet-style simple feature pyramid; strides
  ``s / 2**num_up ... s * 2**num_down``.

Masks (True = padding): memory levels keep theirs (given, or split from the encoder padding mask);
new levels get a nearest resize of the image mask when one is given (``Batch.masks``, as the detector
builds the encoder masks), else a nearest resize of the neighbouring level's mask.

Both adapters share ``forward(levels, masks, strides, image_mask=None) -> FeaturePyramid`` (the call
made by :class:`codetr.heads.collaborative.CollaborativeBranch`; ``masks`` may be None) and
``from_memory(memory, image_mask=None)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.core.interfaces import FeaturePyramid, Memory
from codetr.core.structures import level_masks, resize_mask

__all__ = ["MultiScaleAdapter", "SingleScaleAdapter", "official_adapter_key_map", "memory_masks"]


def memory_masks(memory: Memory) -> list[Tensor]:
    """Per-level (B, H_l, W_l) padding masks split from ``memory.inputs.padding_mask``."""
    b = memory.memory.shape[0]
    out, start = [], 0
    for h, w in memory.inputs.spatial_shapes:
        out.append(memory.inputs.padding_mask[:, start:start + h * w].reshape(b, h, w))
        start += h * w
    return out


def _default_masks(levels: list[Tensor], image_mask: Tensor | None) -> list[Tensor]:
    if image_mask is not None:
        return level_masks(image_mask, [tuple(x.shape[-2:]) for x in levels])
    return [torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device) for x in levels]


class MultiScaleAdapter(nn.Module):
    """Memory levels + ``num_extra`` stride-2 Conv3x3 + GN levels (official Co-DETR ``downsample``).

    Args:
        hidden_dim: channels of the memory (and of the extra levels).
        norm_groups: GroupNorm groups.
        num_extra: number of extra coarser levels (official: 1).
    """

    def __init__(self, hidden_dim: int, norm_groups: int = 32, num_extra: int = 1):
        super().__init__()
        if num_extra < 0:
            raise ValueError("num_extra must be >= 0")
        self.hidden_dim = hidden_dim
        self.num_extra = num_extra
        self.downsample = self._block(hidden_dim, norm_groups) if num_extra >= 1 else None
        self.extra_downsamples = nn.ModuleList([self._block(hidden_dim, norm_groups) for _ in range(num_extra - 1)])
        self.reset_parameters()

    @staticmethod
    def _block(c: int, groups: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(groups, c))

    def reset_parameters(self) -> None:
        """Official: PyTorch's default Conv2d init (uniform +-1/sqrt(fan_in) for weight and bias; the
        official ``init_stats.json`` shows bound 1/48 for 256x3x3), GroupNorm weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
                m.reset_parameters()

    def blocks(self) -> list[nn.Module]:
        return ([self.downsample] if self.downsample is not None else []) + list(self.extra_downsamples)

    def forward(self, levels: list[Tensor], masks: list[Tensor] | None, strides: list[int],
                image_mask: Tensor | None = None) -> FeaturePyramid:
        if len(levels) != len(strides):
            raise ValueError(f"{len(levels)} levels but {len(strides)} strides")
        maps = list(levels)
        masks = list(masks) if masks is not None else _default_masks(maps, image_mask)
        strides = [int(s) for s in strides]
        for block in self.blocks():
            x = block(maps[-1])
            size = tuple(x.shape[-2:])
            masks.append(resize_mask(image_mask if image_mask is not None else masks[-1], size))
            maps.append(x)
            strides.append(strides[-1] * 2)
        return FeaturePyramid(maps=maps, strides=strides, masks=masks)

    def from_memory(self, memory: Memory, image_mask: Tensor | None = None) -> FeaturePyramid:
        """Adapter input straight from the encoder output (levels, strides and masks of ``memory``)."""
        return self(memory.levels(), memory_masks(memory), list(memory.inputs.strides), image_mask)


class SingleScaleAdapter(nn.Module):
    """ViTDet-like simple pyramid from one map (paper §A2, single-scale encoders such as Conditional/DAB-DETR).

    Args:
        hidden_dim: channels (in and out).
        num_down: coarser levels, each Conv3x3 stride 2 + GN on the previous (coarser) one.
        num_up: finer levels, each bilinear x2 upsample + Conv3x3 + GN on the previous (finer) one.
        norm_groups: GroupNorm groups.
    """

    def __init__(self, hidden_dim: int, num_down: int = 2, num_up: int = 1, norm_groups: int = 32):
        super().__init__()
        if num_down < 0 or num_up < 0:
            raise ValueError("num_down and num_up must be >= 0")
        self.hidden_dim = hidden_dim
        self.num_down = num_down
        self.num_up = num_up
        self.down = nn.ModuleList([
            nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 3, stride=2, padding=1),
                          nn.GroupNorm(norm_groups, hidden_dim))
            for _ in range(num_down)])
        self.up = nn.ModuleList([
            nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), nn.GroupNorm(norm_groups, hidden_dim))
            for _ in range(num_up)])
        # PyTorch default conv init, as the official multi-scale ``downsample``.

    def forward(self, levels: list[Tensor], masks: list[Tensor] | None, strides: list[int],
                image_mask: Tensor | None = None) -> FeaturePyramid:
        """Uses the last (coarsest) given level; returns ``num_up + 1 + num_down`` levels, finest first."""
        x, stride = levels[-1], int(strides[-1])
        mask = masks[-1] if masks is not None else _default_masks([x], image_mask)[0]
        if stride % (2 ** self.num_up) != 0:
            raise ValueError(f"stride {stride} cannot be upsampled {self.num_up} times by 2")

        def new_mask(ref: Tensor, size: tuple[int, int]) -> Tensor:
            return resize_mask(image_mask if image_mask is not None else ref, size)

        fine_maps, fine_masks, fine_strides = [], [], []
        cur, cur_mask, cur_stride = x, mask, stride
        for block in self.up:
            size = (cur.shape[-2] * 2, cur.shape[-1] * 2)
            cur = block(F.interpolate(cur, size=size, mode="bilinear", align_corners=False))
            cur_mask = new_mask(cur_mask, size)
            cur_stride //= 2
            fine_maps.insert(0, cur)
            fine_masks.insert(0, cur_mask)
            fine_strides.insert(0, cur_stride)
        maps, out_masks, out_strides = fine_maps + [x], fine_masks + [mask], fine_strides + [stride]
        cur, cur_mask, cur_stride = x, mask, stride
        for block in self.down:
            cur = block(cur)
            cur_mask = new_mask(cur_mask, tuple(cur.shape[-2:]))
            cur_stride *= 2
            maps.append(cur)
            out_masks.append(cur_mask)
            out_strides.append(cur_stride)
        return FeaturePyramid(maps=maps, strides=out_strides, masks=out_masks)

    def from_memory(self, memory: Memory, image_mask: Tensor | None = None) -> FeaturePyramid:
        return self(memory.levels(), memory_masks(memory), list(memory.inputs.strides), image_mask)


def official_adapter_key_map(key: str) -> str | None:
    """Official ``query_head.downsample.{0,1}.*`` -> :class:`MultiScaleAdapter` ``downsample.{0,1}.*``; else None."""
    prefix = "query_head.downsample."
    return "downsample." + key[len(prefix):] if key.startswith(prefix) else None
