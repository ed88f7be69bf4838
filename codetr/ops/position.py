"""Sine positional encodings: 2-D feature-map encoding and the per-coordinate box/point embedding.

* :class:`SinePositionalEncoding` -- the DETR / mmdet ``SinePositionalEncoding`` of a padded feature
  map, channel layout ``[y (num_feats), x (num_feats)]``.
* :func:`sine_box_embedding` -- the sine embedding of normalised points / boxes used for two-stage query
  positions and reference-point queries (Deformable-DETR ``get_proposal_pos_embed``, DINO
  ``coordinate_to_encoding`` / Conditional-DETR ``gen_sineembed_for_position``).

Both use ``dim_t[i] = temperature ** (2 * (i // 2) / num_feats)`` for ``i in range(num_feats)`` and
interleave ``sin`` (even channels) and ``cos`` (odd channels): channel ``2k`` is ``sin(v / dim_t[2k])`` and
channel ``2k + 1`` is ``cos(v / dim_t[2k + 1])`` (``dim_t[2k] == dim_t[2k + 1]``). Everything is computed
in float32 (float64 stays float64), in the same operation order as the official code.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["SinePositionalEncoding", "sine_box_embedding", "sine_dim_t"]


def sine_dim_t(num_feats: int, temperature: float, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """(num_feats,) frequencies ``temperature ** (2 * (i // 2) / num_feats)`` (official formula and order)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    return dim_t.to(dtype)


def _interleave_sin_cos(pos: Tensor) -> Tensor:
    """(..., F) -> (..., F): sin on even channels, cos on odd, interleaved (stack + flatten)."""
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionalEncoding(nn.Module):
    """2-D sine positional encoding of a padded feature map (mmdet / DETR semantics).

    For each valid pixel, ``y_embed`` / ``x_embed`` are the cumulative counts of valid pixels along
    H / W (1-based). With ``normalize``: ``(embed + offset) / (last + eps) * scale`` where ``last`` is the
    count at the last row / column (the valid extent). Channel ``c`` of each half is
    ``sin`` (even c) / ``cos`` (odd c) of ``embed / dim_t[c]``. Output channels: ``[y (num_feats), x
    (num_feats)]``.

    Args:
        num_feats: features per axis; output has ``2 * num_feats`` channels.
        temperature: 10000 for Deformable-DETR / Co-Deformable-DETR; 20 for (Co-)DINO in mmdet.
        normalize: normalise the cumulative coordinates by the valid extent.
        scale: multiplier after normalisation (2*pi).
        eps: added to the extent before dividing.
        offset: added to the cumulative coordinate before normalising (-0.5 in Deformable-DETR /
            Co-Deformable-DETR configs: pixel centres; 0 in DETR / DINO).
    """

    def __init__(self, num_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float = 2 * math.pi, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """Args: mask (B, H, W) bool, True on padding. Returns (B, 2 * num_feats, H, W) float32."""
        if mask.dim() != 3:
            raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
        not_mask = 1 - mask.to(torch.int)
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = sine_dim_t(self.num_feats, self.temperature, device=mask.device)
        pos_x = _interleave_sin_cos(x_embed[:, :, :, None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[:, :, :, None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_feats={self.num_feats}, temperature={self.temperature}, normalize={self.normalize}, "
                f"scale={self.scale:.4f}, eps={self.eps}, offset={self.offset}")


def sine_box_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000,
                       scale: float = 2 * math.pi, order: Literal["xywh", "yxwh"] = "xywh") -> Tensor:
    """Per-coordinate sine embedding of normalised points / boxes.

    Each coordinate ``v`` becomes ``num_feats`` channels ``[sin(v*scale/dim_t[0]), cos(v*scale/dim_t[1]),
    sin(v*scale/dim_t[2]), ...]``; the per-coordinate blocks are concatenated in ``order``:

    * ``"xywh"`` -- the input order: (cx, cy, w, h) for boxes, (x, y) for points. This is Deformable-DETR's
      two-stage ``get_proposal_pos_embed`` (official, mmdet 2/3, Co-Deformable-DETR's query positions and
      its aux-query ``pos_embed``); note the official function takes *unact* proposals and applies the
      sigmoid itself -- here pass the sigmoid (normalised) boxes.
    * ``"yxwh"`` -- (y, x, w, h) / (y, x): DINO's ``coordinate_to_encoding`` (mmdet 3 DINO / Co-DINO decoder
      ``ref_point_head`` input), Conditional-DETR / DAB-DETR ``gen_sineembed_for_position``.

    Args:
        boxes: (..., 4) normalised cxcywh or (..., 2) normalised xy.
        num_feats: channels per coordinate (128 -> 512 for boxes, 256 for points).
        temperature: 10000 in all the variants above.
        scale: 2*pi.
        order: see above.

    Returns:
        (..., num_feats * k) with k = boxes.shape[-1], float32 (float64 for float64 input).
    """
    k = boxes.shape[-1]
    if k not in (2, 4):
        raise ValueError(f"boxes must end with 2 (x, y) or 4 (cx, cy, w, h) coordinates, got {k}")
    if order not in ("xywh", "yxwh"):
        raise ValueError(f"order must be 'xywh' (Deformable-DETR) or 'yxwh' (DINO), got {order!r}")
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    boxes = boxes.to(dtype) * scale
    dim_t = sine_dim_t(num_feats, temperature, device=boxes.device, dtype=dtype)
    pos = _interleave_sin_cos(boxes[..., None] / dim_t)  # (..., k, num_feats)
    if order == "yxwh":
        perm = [1, 0] + list(range(2, k))
        pos = pos[..., perm, :]
    return pos.flatten(-2)
