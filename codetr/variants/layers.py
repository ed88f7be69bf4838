"""Transformer building blocks shared by the deformable DETR variants.

Every layer here is **post-norm** (``x = norm(x + sublayer(x))``) like Deformable-DETR, H-DETR, DINO and both
official Co-DETR code bases. Tensors are batch-first: queries ``(B, Q, C)``, memory ``(B, S, C)``.

Parameter names (``fc1``/``fc2``, ``norm1..3``, ``self_attn``, ``cross_attn``, ``layers.{i}``) define codetr's
state-dict layout; :mod:`codetr.convert.official` maps the official mmdet / Sense-X names onto them.
"""

from __future__ import annotations

from torch import Tensor, nn

from codetr.ops.msda import MultiScaleDeformableAttention

__all__ = [
    "inverse_sigmoid",
    "MLP",
    "FFN",
    "DeformableEncoderLayer",
    "DeformableDecoderLayer",
]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms clamped to ``eps`` (official semantics)."""
    x = x.clamp(min=0, max=1)
    return (x.clamp(min=eps) / (1 - x).clamp(min=eps)).log()


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (the DETR box head: 256-ReLU-256-ReLU-4)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = x.relu()
        return x


class FFN(nn.Module):
    """``x + drop(fc2(drop(relu(fc1(x)))))`` (residual included, norm applied by the caller)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop2(self.fc2(self.drop1(self.fc1(x).relu())))


class DeformableEncoderLayer(nn.Module):
    """MSDA self-attention over all levels -> LN -> FFN -> LN."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points, dropout,
                                                       batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]],
                padding_mask: Tensor) -> Tensor:
        """x, pos (B, S, C); reference_points (B, S, L, 2) in padded-map coordinates; padding_mask (B, S)."""
        x = self.self_attn(x, x, reference_points, spatial_shapes, padding_mask, query_pos=pos)
        x = self.norm1(x)
        return self.norm2(self.ffn(x))


class DeformableDecoderLayer(nn.Module):
    """Self-attention (pos added to q and k) -> LN -> MSDA cross-attention -> LN -> FFN -> LN."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points, dropout,
                                                        batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: Tensor,
                self_attn_mask: Tensor | None = None) -> Tensor:
        """x, pos (B, Q, C); reference_points (B, Q, L, 2|4) in padded-map coordinates; memory (B, S, C).

        ``self_attn_mask``: None, (Q, Q) or (B * heads, Q, Q) bool with True = attention blocked.
        """
        q = x + pos
        sa = self.self_attn(q, q, x, attn_mask=self_attn_mask, need_weights=False)[0]
        x = self.norm1(x + self.self_attn_drop(sa))
        x = self.cross_attn(x, memory, reference_points, spatial_shapes, padding_mask, query_pos=pos)
        x = self.norm2(x)
        return self.norm3(self.ffn(x))
