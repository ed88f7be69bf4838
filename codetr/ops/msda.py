"""Multi-scale deformable attention (MSDA), pure PyTorch.

Two public objects:

* :func:`multi_scale_deformable_attn` -- the sampling core: bilinear sampling of every (query, head,
  level, point) location from its level's value map, weighted by the attention weights and summed.
* :class:`MultiScaleDeformableAttention` -- the full attention module (value / offset / weight / output
  projections, mmcv semantics and parameter names, so official Deformable-DETR, Co-DETR and DINO state
  dicts load 1:1).

Semantics (identical to the official CUDA kernel and to mmcv's ``multi_scale_deformable_attn_pytorch``):

* A normalised location ``(x, y)`` in [0, 1] refers to the **full (padded) map** of its level; the
  top-left corner of the map is (0, 0), the bottom-right corner (1, 1), and the centre of pixel
  ``(i, j)`` is ``((j + 0.5) / W, (i + 0.5) / H)`` (``align_corners=False``).
* Sampling is bilinear; each of the four neighbours that falls outside the map contributes 0 (zero
  padding), so a location on the outer border of the map gets a partial (fractional) value and one
  beyond half a pixel outside gets exactly 0.
* ``attention_weights`` must already be normalised (softmax jointly over levels x points).

Numerics: the sampling always runs in at least float32. Half / bfloat16 inputs (e.g. under
``torch.autocast``) are cast up to float32 with autocast disabled locally, and the result is cast back to
``value``'s dtype; float64 inputs are computed in float64. The per-level weighted sum is accumulated level
by level (instead of mmcv's stack-then-sum) which avoids materialising an extra
``(B*H, Dh, Q, L*P)`` tensor; the two orders differ by float32 rounding only (~1e-7 relative).

Device-agnostic (CPU / CUDA / anything ``F.grid_sample`` supports); no compiled extension.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["multi_scale_deformable_attn", "MultiScaleDeformableAttention", "as_shape_list"]


def as_shape_list(spatial_shapes: Sequence[Sequence[int]] | Tensor) -> list[tuple[int, int]]:
    """Normalise ``spatial_shapes`` to a list of python ``(H_l, W_l)`` tuples.

    Pass python ints wherever possible: a tensor is accepted for convenience but converting it reads it
    back to the host (a device sync, and a graph break under ``torch.compile``).
    """
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[-1] != 2:
            raise ValueError(f"spatial_shapes tensor must be (L, 2) rows of (H, W), got {tuple(spatial_shapes.shape)}")
        spatial_shapes = spatial_shapes.tolist()
    out: list[tuple[int, int]] = []
    for i, hw in enumerate(spatial_shapes):
        if len(hw) != 2:
            raise ValueError(f"spatial_shapes[{i}] must be (H, W), got {hw!r}")
        h, w = int(hw[0]), int(hw[1])
        if h <= 0 or w <= 0:
            raise ValueError(f"spatial_shapes[{i}] = ({h}, {w}) must be positive")
        out.append((h, w))
    return out


def _no_autocast(device_type: str):
    """Autocast disabled for ``device_type`` (a no-op context for types autocast does not know, e.g. meta)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def multi_scale_deformable_attn(value: Tensor, spatial_shapes: Sequence[Sequence[int]] | Tensor,
                                sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Sample multi-level value maps at normalised locations and sum them with attention weights.

    Args:
        value: (B, S, H, Dh) per-head values, levels concatenated in level order (row-major inside a
            level), S = sum_l H_l * W_l. Padding tokens should already be zero.
        spatial_shapes: L ``(H_l, W_l)`` python int pairs, in the order the levels appear in ``value``.
        sampling_locations: (B, Q, H, L, P, 2) normalised ``(x, y)`` in [0, 1] over each level's full
            map (values outside [0, 1] are allowed and sample zero padding).
        attention_weights: (B, Q, H, L, P), already softmax-normalised jointly over L * P.

    Returns:
        (B, Q, H * Dh), heads concatenated head-major, in ``value.dtype``.

    The computation runs in float32 (float64 for float64 inputs) with autocast disabled, whatever the
    input dtypes; see the module docstring.
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, H, Dh), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (B, Q, H, L, P, 2) normalised (x, y), got shape "
                         f"{tuple(sampling_locations.shape)}")
    shapes = as_shape_list(spatial_shapes)
    b, s, h, dh = value.shape
    bl, q, hl, nl, p, _ = sampling_locations.shape
    if (bl, hl) != (b, h):
        raise ValueError(f"sampling_locations batch/heads {(bl, hl)} do not match value's {(b, h)}")
    if nl != len(shapes):
        raise ValueError(f"sampling_locations has {nl} levels but spatial_shapes lists {len(shapes)}")
    if tuple(attention_weights.shape) != (b, q, h, nl, p):
        raise ValueError(f"attention_weights must be (B, Q, H, L, P) = {(b, q, h, nl, p)}, got "
                         f"{tuple(attention_weights.shape)}")
    total = sum(hh * ww for hh, ww in shapes)
    if total != s:
        raise ValueError(f"spatial_shapes {shapes} cover {total} tokens but value has S = {s} tokens")

    out_dtype = value.dtype
    cdtype = _compute_dtype(value.dtype)
    with _no_autocast(value.device.type):
        value = value.to(cdtype)
        grids = 2.0 * sampling_locations.to(cdtype) - 1.0  # (B, Q, H, L, P, 2) in [-1, 1]
        weights = attention_weights.to(cdtype)
        value_levels = value.split([hh * ww for hh, ww in shapes], dim=1)
        out = None
        for lvl, (hh, ww) in enumerate(shapes):
            # (B, HW, H, Dh) -> (B, H*Dh, HW) -> (B*H, Dh, H_l, W_l)
            v = value_levels[lvl].flatten(2).transpose(1, 2).reshape(b * h, dh, hh, ww)
            # (B, Q, H, P, 2) -> (B, H, Q, P, 2) -> (B*H, Q, P, 2)
            g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
            sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
            # sampled: (B*H, Dh, Q, P); weights of this level: (B, Q, H, P) -> (B*H, 1, Q, P)
            w = weights[:, :, :, lvl].transpose(1, 2).reshape(b * h, 1, q, p)
            term = (sampled * w).sum(-1)  # (B*H, Dh, Q)
            out = term if out is None else out + term
        assert out is not None
        out = out.view(b, h * dh, q).transpose(1, 2).contiguous()
    return out.to(out_dtype)


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention module (Deformable-DETR), mmcv-compatible.

    Parameter names match mmcv's ``MultiScaleDeformableAttention`` (``sampling_offsets``,
    ``attention_weights``, ``value_proj``, ``output_proj``), so official checkpoints map 1:1.

    Args:
        embed_dims: C, channels of query and value.
        num_heads: H.
        num_levels: L.
        num_points: P sampling points per (head, level).
        dropout: dropout on the projected output before the residual (mmcv semantics).
        batch_first: True -> query/value/identity/query_pos are (B, N, C); False -> (N, B, C).
            ``reference_points`` and ``key_padding_mask`` are always batch-first.
        value_proj_ratio: value projection width = ``int(embed_dims * value_proj_ratio)``.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 dropout: float = 0.0, batch_first: bool = True, value_proj_ratio: float = 1.0) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        value_proj_size = int(embed_dims * value_proj_ratio)
        if value_proj_size % num_heads != 0:
            raise ValueError(f"value projection width {value_proj_size} (embed_dims * value_proj_ratio) must be "
                             f"divisible by num_heads ({num_heads})")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.batch_first = batch_first
        self.value_proj_size = value_proj_size

        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init.

        ``sampling_offsets``: weight 0; bias = for head k the direction (cos, sin)(2*pi*k/H) divided by
        its larger absolute coordinate (so it lies on the unit square), repeated per level and multiplied
        by the point index 1..P. ``attention_weights``: 0 (uniform attention). ``value_proj`` /
        ``output_proj``: xavier-uniform weights, zero bias.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], dim=-1)  # (H, 2)
        grid = grid / grid.abs().max(dim=-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, value: Tensor | None, reference_points: Tensor,
                spatial_shapes: Sequence[Sequence[int]] | Tensor, key_padding_mask: Tensor | None = None,
                identity: Tensor | None = None, query_pos: Tensor | None = None, *,
                add_identity: bool = True) -> Tensor:
        """Deformable attention of ``query`` over the multi-level ``value`` tokens.

        Args:
            query: (B, Q, C) (or (Q, B, C) when ``batch_first=False``).
            value: (B, S, C) tokens of all levels concatenated (level order, row-major), or None to use
                ``query`` (encoder self-attention, mmcv semantics).
            reference_points: (B, Q, L, 2) normalised (x, y), or (B, Q, L, 4) normalised (cx, cy, w, h),
                per level (already multiplied by the valid ratios, i.e. relative to the padded maps).
                2-D: ``loc = ref + offset / (W_l, H_l)``; 4-D: ``loc = ref_xy + offset / P * ref_wh / 2``.
            spatial_shapes: L ``(H_l, W_l)`` python int pairs.
            key_padding_mask: (B, S) bool, True on padding tokens (their values are zeroed before
                sampling), or None.
            identity: residual added to the output, same layout as ``query``. None -> ``query`` itself
                (before ``query_pos`` is added), as mmcv does.
            query_pos: positional embedding added to ``query`` before computing offsets and weights.
            add_identity: False -> return ``dropout(output_proj(attn))`` without any residual.

        Returns:
            (B, Q, C) (or (Q, B, C)) = ``dropout(output_proj(attn)) + identity``.
        """
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.transpose(0, 1)
            value = value.transpose(0, 1)

        b, nq, _ = query.shape
        bv, nv, _ = value.shape
        shapes = as_shape_list(spatial_shapes)
        hh, ll, pp = self.num_heads, self.num_levels, self.num_points
        if bv != b:
            raise ValueError(f"query batch {b} != value batch {bv}")
        if len(shapes) != ll:
            raise ValueError(f"spatial_shapes lists {len(shapes)} levels but the module has num_levels={ll}")
        total = sum(h * w for h, w in shapes)
        if total != nv:
            raise ValueError(f"spatial_shapes {shapes} cover {total} tokens but value has {nv} tokens")
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError("reference_points must be (B, Q, L, 2) normalised xy or (B, Q, L, 4) normalised "
                             f"cxcywh; got shape {tuple(reference_points.shape)} (last dim "
                             f"{reference_points.shape[-1] if reference_points.dim() else '?'})")
        if tuple(reference_points.shape[:3]) != (b, nq, ll):
            raise ValueError(f"reference_points leading dims {tuple(reference_points.shape[:3])} must be "
                             f"(B, Q, L) = {(b, nq, ll)}")

        value = self.value_proj(value)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (b, nv):
                raise ValueError(f"key_padding_mask must be (B, S) = {(b, nv)}, got {tuple(key_padding_mask.shape)}")
            if key_padding_mask.dtype != torch.bool:
                raise ValueError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(b, nv, hh, -1)

        # Offsets / weights are produced by the (possibly autocast) projections, then handled in >= fp32.
        cdtype = _compute_dtype(query.dtype)
        offsets = self.sampling_offsets(query).to(cdtype).view(b, nq, hh, ll, pp, 2)
        weights = self.attention_weights(query).to(cdtype).view(b, nq, hh, ll * pp)
        weights = weights.softmax(-1).view(b, nq, hh, ll, pp)
        ref = reference_points.to(cdtype)
        if ref.shape[-1] == 2:
            normalizer = torch.tensor([(w, h) for h, w in shapes], dtype=cdtype, device=ref.device)  # (L, 2)
            locations = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            locations = (ref[:, :, None, :, None, :2]
                         + offsets / pp * ref[:, :, None, :, None, 2:] * 0.5)

        out = multi_scale_deformable_attn(value, shapes, locations, weights)
        out = self.output_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        out = self.dropout(out)
        return out + identity if add_identity else out

    def extra_repr(self) -> str:
        return (f"embed_dims={self.embed_dims}, num_heads={self.num_heads}, num_levels={self.num_levels}, "
                f"num_points={self.num_points}, batch_first={self.batch_first}")
