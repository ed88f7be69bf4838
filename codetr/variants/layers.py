"""Transformer building blocks shared by the deformable DETR variants.

Every layer here is **post-norm** (``x = norm(x + sublayer(x))``) like Deformable-DETR, H-DETR, DINO and both
official Co-DETR code bases. Tensors are batch-first: queries ``(B, Q, C)``, memory ``(B, S, C)``.

Parameter names (``fc1``/``fc2``, ``norm1..3``, ``self_attn``, ``cross_attn``, ``layers.{i}``) define codetr's
state-dict layout; :mod:`codetr.convert.official` maps the official mmdet / Sense-X names onto them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from codetr.core.interfaces import (EXTRAS_ENC_BOXES, DecoderOutputs, EXTRAS_ENC_BOXES_UNACT_ALL, EXTRAS_ENC_LOGITS,
                                    EXTRAS_ENC_LOGITS_ALL, EXTRAS_ENC_PROPOSALS_UNACT, EXTRAS_ENC_VALID,
                                    EXTRAS_TOPK_BOXES_UNACT, EXTRAS_TOPK_INDICES, EncoderInputs)
from codetr.ops.functional import inverse_sigmoid
from codetr.ops.msda import MultiScaleDeformableAttention

__all__ = [
    "MLP",
    "FFN",
    "DeformableEncoderLayer",
    "DeformableDecoderLayer",
    "LayerStack",
    "valid_ratio",
    "flatten_levels",
    "encoder_reference_points",
    "run_encoder",
    "init_transformer_weights",
    "prediction_heads",
    "init_prediction_heads",
    "grid_proposals",
    "two_stage_proposals",
    "apply_box_delta",
    "stack_references",
    "slice_outputs",
]


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
        h = self.fc1(x)
        if h.requires_grad:  # in-place ops on Linear outputs (views) would cost autograd a CopySlices clone
            return x + self.drop2(self.fc2(self.drop1(h.relu())))
        # no graph: ReLU (and the residual, when no dtype promotion is involved) in place on fresh outputs,
        # saving two large allocations per layer
        y = self.drop2(self.fc2(self.drop1(h.relu_())))
        return y.add_(x) if y.dtype == x.dtype else x + y


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


# ---------------------------------------------------------------------- encoder-side helpers
class LayerStack(nn.Module):
    """Holds ``layers`` (keeps the ``encoder.layers.{i}`` / ``decoder.layers.{i}`` key layout)."""

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


def valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask -> (B, 2) (w, h) fraction of the map covered by the image (official formula)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def flatten_levels(levels: list[Tensor], masks: list[Tensor], strides: list[int], positional_encoding: nn.Module,
                   level_embed: Tensor) -> EncoderInputs:
    """L maps (B, C, H_l, W_l) + padding masks -> :class:`EncoderInputs` (tokens, sine PE + level embedding,
    padding mask, shapes, level starts, valid ratios), the common ``prepare`` of the deformable variants."""
    feats, pos, pads, shapes, ratios = [], [], [], [], []
    for lvl, (x, mask) in enumerate(zip(levels, masks)):
        b, c, h, w = x.shape
        shapes.append((int(h), int(w)))
        p = positional_encoding(mask).to(x.dtype) + level_embed[lvl].view(1, c, 1, 1)
        feats.append(x.flatten(2).transpose(1, 2))
        pos.append(p.flatten(2).transpose(1, 2))
        pads.append(mask.flatten(1))
        ratios.append(valid_ratio(mask))
    sizes = torch.tensor([h * w for h, w in shapes], dtype=torch.int64, device=levels[0].device)
    level_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return EncoderInputs(
        feats=torch.cat(feats, 1), pos=torch.cat(pos, 1), padding_mask=torch.cat(pads, 1),
        spatial_shapes=shapes, level_start=level_start, valid_ratios=torch.stack(ratios, 1).to(levels[0].dtype),
        strides=list(strides))


def encoder_reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Token centres of every level in valid-image coordinates, scaled to every level: (B, S, L, 2) (x, y)."""
    dev, dt = valid_ratios.device, valid_ratios.dtype
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=dt, device=dev),
                                torch.linspace(0.5, w - 0.5, w, dtype=dt, device=dev), indexing="ij")
        ry = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        rx = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((rx, ry), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def run_encoder(layers: Iterable[nn.Module], inputs: EncoderInputs, checkpoint_layers: int = 0) -> Tensor:
    """Run :class:`DeformableEncoderLayer` s over the flattened tokens: (B, S, C) memory.

    ``checkpoint_layers``: the first N layers run under activation checkpointing while gradients are
    enabled (official ``with_cp``): their activations are recomputed in the backward pass, trading about
    one extra encoder-layer forward each for memory. Outputs and gradients are unchanged (no dropout
    randomness is lost: ``torch.utils.checkpoint`` replays the RNG state).
    """
    ref = encoder_reference_points(inputs.spatial_shapes, inputs.valid_ratios)
    x = inputs.feats
    for i, layer in enumerate(layers):
        if i < checkpoint_layers and torch.is_grad_enabled():
            x = checkpoint(layer, x, inputs.pos, ref, inputs.spatial_shapes, inputs.padding_mask, use_reentrant=False)
        else:
            x = layer(x, inputs.pos, ref, inputs.spatial_shapes, inputs.padding_mask)
    return x


def grid_proposals(padding_mask: Tensor, shapes: list[tuple[int, int]], dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor]:
    """Two-stage base proposal per token: centre ``(i+0.5)/valid``, size ``0.05 * 2**lvl``, in logit space.

    Returns ``(proposals_unact (B, S, 4), valid (B, S))``; invalid = padding or any coordinate outside
    (0.01, 0.99), where the proposal is +inf.
    """
    b = padding_mask.shape[0]
    dev = padding_mask.device
    out, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        m = padding_mask[:, start:start + h * w].view(b, h, w)
        valid_h = (~m[:, :, 0]).sum(1)
        valid_w = (~m[:, 0, :]).sum(1)
        gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h, dtype=torch.float32, device=dev),
                                torch.linspace(0, w - 1, w, dtype=torch.float32, device=dev), indexing="ij")
        grid = torch.cat([gx.unsqueeze(-1), gy.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(b, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(b, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        out.append(torch.cat((grid, wh), -1).view(b, -1, 4))
        start += h * w
    props = torch.cat(out, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1) & ~padding_mask
    props = torch.log(props / (1 - props)).masked_fill(~valid.unsqueeze(-1), float("inf"))
    return props.to(dtype), valid


def two_stage_proposals(memory: Tensor, inputs: EncoderInputs, enc_output: nn.Module, enc_output_norm: nn.Module,
                        class_head: nn.Module, box_head: nn.Module, num_select: int, *,
                        score: Literal["class0", "max"], mask_invalid: bool,
                        loss_on: Literal["all", "topk"]) -> dict[str, Tensor]:
    """Two-stage proposals: every encoder token is scored as a proposal and the best ``num_select`` are kept.

    Common part (Deformable-DETR two-stage and DINO): the token's grid proposal (:func:`grid_proposals`);
    ``enc_output_norm(enc_output(memory))`` with invalid tokens zeroed first; ``class_head`` gives the
    (B, S, C') logits and ``box_head(.) + proposal`` the (B, S, 4) refined boxes in logit space.

    The variant-specific bits are parameters:

    * ``score``: ranking of the tokens, ``"class0"`` = the first class logit (Deformable-DETR's
      class-agnostic encoder head) or ``"max"`` = the maximum class logit (DINO's class-specific head);
    * ``mask_invalid``: rank invalid tokens (padding, proposal outside (0.01, 0.99)) last (the official
      code ranks them by their logit; identical whenever it selects none);
    * ``loss_on``: what the encoder loss trains (``EXTRAS_ENC_LOGITS`` / ``EXTRAS_ENC_BOXES``): ``"all"``
      tokens (Deformable-DETR) or the selected ``"topk"`` (DINO).

    Args:
        memory: (B, S, C) encoder output.
        inputs: the encoder's inputs (padding mask, spatial shapes).
        num_select: k before clamping to S.

    Returns:
        The ``Memory.extras`` entries keyed by the ``EXTRAS_*`` constants of :mod:`codetr.core.interfaces`
        (shapes and frames documented there); ``k = min(num_select, S)``.
    """
    proposals, valid = grid_proposals(inputs.padding_mask, inputs.spatial_shapes, memory.dtype)
    out = memory.masked_fill(~valid.unsqueeze(-1), 0.0)
    out = enc_output_norm(enc_output(out))
    logits = class_head(out)
    boxes_unact = box_head(out) + proposals
    ranking = logits[..., 0] if score == "class0" else logits.max(-1)[0]
    if mask_invalid:
        ranking = ranking.masked_fill(~valid, float("-inf"))
    k = min(num_select, ranking.shape[1])
    topk = torch.topk(ranking, k, dim=1)[1]
    topk_unact = torch.gather(boxes_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4))
    if loss_on == "topk":
        loss_logits = torch.gather(logits, 1, topk.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        loss_boxes = topk_unact.sigmoid()
    else:
        loss_logits, loss_boxes = logits, boxes_unact.sigmoid()
    return {
        EXTRAS_ENC_LOGITS: loss_logits,
        EXTRAS_ENC_BOXES: loss_boxes,
        EXTRAS_ENC_LOGITS_ALL: logits,
        EXTRAS_ENC_BOXES_UNACT_ALL: boxes_unact,
        EXTRAS_ENC_PROPOSALS_UNACT: proposals,
        EXTRAS_ENC_VALID: valid,
        EXTRAS_TOPK_INDICES: topk,
        EXTRAS_TOPK_BOXES_UNACT: topk_unact.detach(),
    }


# ---------------------------------------------------------------------- prediction heads / init
def prediction_heads(dim: int, num_classes: int, count: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``count`` class heads ``Linear(C, num_classes)``, then ``count`` box heads ``MLP(C, C, 4, 3)`` (the
    construction order fixes the RNG draws of a seeded build). Returned as ``(class_heads, box_heads)``."""
    class_heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(count))
    box_heads = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(count))
    return class_heads, box_heads


def init_prediction_heads(class_heads: Iterable[nn.Linear], box_heads: Iterable[MLP], prior_prob: float) -> None:
    """Official head init (no RNG draws): class bias ``-log((1 - p) / p)`` (focal prior ``p``), last box layer
    zero weight and bias (boxes start at the reference)."""
    bias = -math.log((1 - prior_prob) / prior_prob)
    for head in class_heads:
        nn.init.constant_(head.bias, bias)
    for head in box_heads:
        nn.init.zeros_(head.layers[-1].weight)
        nn.init.zeros_(head.layers[-1].bias)


def init_transformer_weights(encoder: nn.Module, decoder: nn.Module, level_embed: Tensor, root: nn.Module) -> None:
    """Official DETR-family init shared by the variants: xavier-uniform for every >1-D encoder/decoder
    weight, the MSDA init (zero offset weights + directional offset bias, uniform attention) for every
    :class:`MultiScaleDeformableAttention` under ``root``, and a normal init of the level embeddings."""
    for module in (encoder, decoder):
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    for m in root.modules():
        if isinstance(m, MultiScaleDeformableAttention):
            m.init_weights()
    nn.init.normal_(level_embed)


# ---------------------------------------------------------------------- box refinement helpers
def apply_box_delta(delta: Tensor, ref: Tensor) -> Tensor:
    """(..., 4) box-head output ``delta`` + ``inverse_sigmoid(ref)``: on all 4 coordinates for 4-D references
    (normalised cxcywh), only on (cx, cy) for 2-D reference points (w, h are then the raw ``delta`` logits).
    Returns logits (apply ``sigmoid`` for normalised cxcywh)."""
    if ref.shape[-1] == 4:
        return delta + inverse_sigmoid(ref)
    return torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], -1)


def stack_references(refs: list[Tensor]) -> Tensor:
    """Stack L per-layer references (B, Q, 2|4) into (L, B, Q, D); when 2-D points and 4-D boxes mix (one-stage
    + refinement), the points are padded with w = h = 0 (D = 4)."""
    if len({r.shape[-1] for r in refs}) > 1:
        refs = [r if r.shape[-1] == 4 else torch.cat([r, r.new_zeros(r.shape)], -1) for r in refs]
    return torch.stack(refs)


def slice_outputs(outputs: DecoderOutputs, lo: int | None, hi: int | None) -> DecoderOutputs:
    """Queries ``lo:hi`` of every layer's outputs (a part of a jointly decoded group, ``split_outputs``)."""
    return DecoderOutputs(logits=outputs.logits[:, :, lo:hi], boxes=outputs.boxes[:, :, lo:hi],
                          hidden=outputs.hidden[:, :, lo:hi], references=outputs.references[:, :, lo:hi])
