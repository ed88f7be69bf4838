"""Transformer layers of the single-scale conditional DETR variants (Conditional-DETR, DAB-DETR).

Every layer is **post-norm** like the originals (``x = norm(x + dropout(sublayer(x)))``). Tensors are
batch-first: queries ``(B, Q, C)``, memory ``(B, S, C)``; ``S = H * W`` tokens of the one feature map.

* :class:`SingleScaleEncoder` -- the DETR encoder: per layer ``q = k = x + pos``, ``v = x`` multi-head
  self-attention, LN, FFN, LN. With ``pos_scale`` (DAB-DETR) the positional encoding of layer ``i`` is
  ``pos * query_scale(x_i)`` (an MLP of the layer input, element-wise).
* :class:`ConditionalDecoderLayer` -- Conditional-DETR's decoder layer (also DAB-DETR's):

  - self-attention with separate content / positional projections: ``q = q_content(x) + q_pos(p)``,
    ``k = k_content(x) + k_pos(p)``, ``v = v(x)`` (``p`` = the positional query);
  - **conditional cross-attention**: per head, the query is ``[q_content(x) (+ q_pos(p)) | q_pos_sine(s)]``
    and the key ``[k_content(m) (+ k_pos(m_pos)) | k_pos(m_pos)]``, i.e. content and spatial halves
    concatenated, head dim ``2C / heads`` (scale ``(2C / heads) ** -0.5``); values are ``v(m)`` with head dim
    ``C / heads``. ``s`` is the (transformed) sine embedding of the reference point computed by the caller.
    The positional query is added to the content query (and the memory PE to the content key) only when
    the layer has ``q_pos`` (``is_first`` or ``keep_query_pos``; the original removes the projection from
    the other layers);
  - FFN with ReLU or PReLU (:class:`ConditionalFFN`).

* :class:`ConditionalDecoder` -- holds ``layers``, the output LayerNorm ``norm``, the ``query_scale`` MLP and
  the variant's reference heads (``ref_point_head``, optionally ``ref_anchor_head``); the per-layer loop is
  the variant's (references differ: a fixed 2-D point vs. refined 4-D anchors).

Attention masks are bool with **True = blocked**: the decoder self-attention takes ``None``, ``(Q, Q)`` or
``(B * heads, Q, Q)``; key padding masks are ``(B, S)``, True on padded tokens. Softmax runs in float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from codetr.variants.layers import MLP

__all__ = ["Activation", "ConditionalFFN", "SingleScaleEncoderLayer", "SingleScaleEncoder",
           "ConditionalSelfAttention", "ConditionalCrossAttention", "ConditionalDecoderLayer",
           "ConditionalDecoder", "multi_head_attention"]

Activation = Literal["relu", "prelu"]


def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, *, attn_mask: Tensor | None = None,
                         key_padding_mask: Tensor | None = None, dropout: float = 0.0, training: bool = False
                         ) -> Tensor:
    """Scaled dot-product attention over already projected inputs.

    Args:
        q: (B, Q, H * Dq) queries; k: (B, S, H * Dq) keys; v: (B, S, H * Dv) values.
        attn_mask: None, (Q, S) or (B * H, Q, S) bool, True = blocked.
        key_padding_mask: None or (B, S) bool, True on padded keys.

    Returns:
        (B, Q, H * Dv), heads concatenated head-major. The scale is ``Dq ** -0.5``.
    """
    b, nq, _ = q.shape
    s = k.shape[1]
    qh = q.view(b, nq, num_heads, -1).transpose(1, 2)
    kh = k.view(b, s, num_heads, -1).transpose(1, 2)
    vh = v.view(b, s, num_heads, -1).transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(2, 3)) * qh.shape[-1] ** -0.5  # (B, H, Q, S)
    blocked = None
    if attn_mask is not None:
        blocked = attn_mask.view(b, num_heads, nq, s) if attn_mask.dim() == 3 else attn_mask.view(1, 1, nq, s)
    if key_padding_mask is not None:
        pad = key_padding_mask.view(b, 1, 1, s)
        blocked = pad if blocked is None else blocked | pad
    if blocked is not None:
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
    weights = scores.float().softmax(-1).to(vh.dtype)
    if dropout > 0 and training:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, vh).transpose(1, 2).reshape(b, nq, -1)


class ConditionalFFN(nn.Module):
    """``x + drop2(fc2(drop1(act(fc1(x)))))`` (residual included, norm applied by the caller).

    ``activation``: ``"relu"`` or ``"prelu"`` (one learned slope per layer, ``nn.PReLU()`` init 0.25, as
    DAB-DETR's ``_get_activation_fn``); the PReLU is the module ``act`` (state-dict key ``act.weight``).
    """

    def __init__(self, dim: int, ffn_dim: int, dropout: float, activation: Activation = "relu") -> None:
        super().__init__()
        if activation not in ("relu", "prelu"):
            raise ValueError(f"activation must be 'relu' or 'prelu', got {activation!r}")
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.act = nn.PReLU() if activation == "prelu" else nn.ReLU()
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SingleScaleEncoderLayer(nn.Module):
    """DETR encoder layer: MHA (q = k = x + pos, v = x; padded keys masked) -> LN -> FFN -> LN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, activation: Activation = "relu"
                 ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = ConditionalFFN(dim, ffn_dim, dropout, activation)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        """x, pos (B, S, C); padding_mask (B, S) True on padding. Returns (B, S, C)."""
        q = x + pos
        sa = self.self_attn(q, q, x, key_padding_mask=padding_mask, need_weights=False)[0]
        x = self.norm1(x + self.drop(sa))
        return self.norm2(self.ffn(x))


class SingleScaleEncoder(nn.Module):
    """``layers`` (:class:`SingleScaleEncoderLayer`) plus, with ``pos_scale``, ``query_scale`` = MLP(C, C, C, 2):
    layer ``i`` then sees ``pos * query_scale(x_i)`` instead of ``pos`` (DAB-DETR's encoder)."""

    def __init__(self, layers: Iterable[nn.Module], dim: int, pos_scale: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.query_scale = MLP(dim, dim, dim, 2) if pos_scale else None

    def forward(self, x: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        """x, pos (B, S, C) tokens and their (unscaled) sine PE; padding_mask (B, S). Returns the memory."""
        for layer in self.layers:
            p = pos if self.query_scale is None else pos * self.query_scale(x)
            x = layer(x, p, padding_mask)
        return x


class ConditionalSelfAttention(nn.Module):
    """Decoder self-attention with content and positional projections (``q_content``, ``q_pos``,
    ``k_content``, ``k_pos``, ``v``, ``out_proj``)."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_content = nn.Linear(dim, dim)
        self.q_pos = nn.Linear(dim, dim)
        self.k_content = nn.Linear(dim, dim)
        self.k_pos = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, query_pos: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x, query_pos (B, Q, C); attn_mask None, (Q, Q) or (B * heads, Q, Q) bool (True = blocked)."""
        q = self.q_content(x) + self.q_pos(query_pos)
        k = self.k_content(x) + self.k_pos(query_pos)
        out = multi_head_attention(q, k, self.v(x), self.num_heads, attn_mask=attn_mask, dropout=self.dropout,
                                   training=self.training)
        return self.out_proj(out)


class ConditionalCrossAttention(nn.Module):
    """Conditional cross-attention (content and spatial halves concatenated per head, see the module
    docstring). ``q_pos`` exists only when ``with_query_pos`` (first layer, or DAB's ``keep_query_pos``)."""

    def __init__(self, dim: int, num_heads: int, dropout: float, with_query_pos: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_content = nn.Linear(dim, dim)
        self.q_pos = nn.Linear(dim, dim) if with_query_pos else None
        self.k_content = nn.Linear(dim, dim)
        self.k_pos = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.q_pos_sine = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, query_pos: Tensor, query_sine: Tensor, memory: Tensor, memory_pos: Tensor,
                padding_mask: Tensor) -> Tensor:
        """x, query_pos (B, Q, C); query_sine (B, Q, C) the transformed sine embedding of the reference;
        memory, memory_pos (B, S, C); padding_mask (B, S) True on padded tokens."""
        b, nq, c = x.shape
        s, h = memory.shape[1], self.num_heads
        q = self.q_content(x)
        k = self.k_content(memory)
        k_pos = self.k_pos(memory_pos)
        if self.q_pos is not None:
            q = q + self.q_pos(query_pos)
            k = k + k_pos
        q = torch.cat([q.view(b, nq, h, c // h), self.q_pos_sine(query_sine).view(b, nq, h, c // h)], -1)
        k = torch.cat([k.view(b, s, h, c // h), k_pos.view(b, s, h, c // h)], -1)
        out = multi_head_attention(q.view(b, nq, 2 * c), k.view(b, s, 2 * c), self.v(memory), h,
                                   key_padding_mask=padding_mask, dropout=self.dropout, training=self.training)
        return self.out_proj(out)


class ConditionalDecoderLayer(nn.Module):
    """Self-attention -> LN -> conditional cross-attention -> LN -> FFN -> LN (post-norm)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, activation: Activation = "relu",
                 with_query_pos: bool = False) -> None:
        super().__init__()
        self.self_attn = ConditionalSelfAttention(dim, num_heads, dropout)
        self.drop1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = ConditionalCrossAttention(dim, num_heads, dropout, with_query_pos)
        self.drop2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ConditionalFFN(dim, ffn_dim, dropout, activation)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, query_pos: Tensor, query_sine: Tensor, memory: Tensor, memory_pos: Tensor,
                padding_mask: Tensor, self_attn_mask: Tensor | None = None) -> Tensor:
        """x, query_pos, query_sine (B, Q, C); memory, memory_pos (B, S, C); padding_mask (B, S);
        self_attn_mask None, (Q, Q) or (B * heads, Q, Q) bool (True = blocked). Returns (B, Q, C)."""
        x = self.norm1(x + self.drop1(self.self_attn(x, query_pos, self_attn_mask)))
        ca = self.cross_attn(x, query_pos, query_sine, memory, memory_pos, padding_mask)
        x = self.norm2(x + self.drop2(ca))
        return self.norm3(self.ffn(x))


class ConditionalDecoder(nn.Module):
    """``layers`` + output ``norm`` (LayerNorm C, applied to every layer's output for the heads, not fed
    back) + ``query_scale`` (MLP C -> C -> C: the transformation of the sine embedding from layer 1 on) +
    the variant's ``ref_point_head`` and optional ``ref_anchor_head``."""

    def __init__(self, layers: Iterable[nn.Module], dim: int, ref_point_head: MLP,
                 ref_anchor_head: MLP | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)
        self.query_scale = MLP(dim, dim, dim, 2)
        self.ref_point_head = ref_point_head
        self.ref_anchor_head = ref_anchor_head

    def attention_out_projs(self) -> list[nn.Linear]:
        """The ``out_proj`` of every self- and cross-attention (their biases start at 0, as in the originals)."""
        return [m.out_proj for m in self.modules() if isinstance(m, (ConditionalSelfAttention,
                                                                     ConditionalCrossAttention))]
