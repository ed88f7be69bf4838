"""Conditional-DETR (Meng et al., ICCV 2021) as a :class:`~codetr.core.interfaces.DETRVariant`.

Numerics follow the original repository (``Atten4Vis/ConditionalDETR``, ``models/transformer.py`` /
``conditional_detr.py``); HF ``transformers`` ``ConditionalDetrForObjectDetection`` is the parity oracle
(``tests/variants/test_hf_conditional_parity.py``, differences in ``docs/deviations.md``):

* **Features**: one map, C5 (stride 32; 16 with ``backbone.dilation: true``, "DC5") through a 1x1 conv with
  bias (``channel_mapper`` with ``norm: none``, ``num_extra_levels: 0``); ``model.num_levels`` must be 1.
* **Encoder**: standard post-norm DETR encoder (q = k = x + pos, v = x), sine PE with temperature 10000,
  normalised over the valid extent, scale 2pi, **no** -0.5 offset, no level embedding.
* **Queries**: ``num_queries`` learned positional queries ``query_embedding`` (Q, C) with zero content; the
  reference point ``s = sigmoid(ref_point_head(query_pos))`` (MLP C -> C -> 2) is computed once and fixed
  for every layer.
* **Decoder** (:class:`~codetr.variants.conditional_layers.ConditionalDecoderLayer`): conditional
  self-attention and conditional cross-attention; the spatial query of layer ``l`` is
  ``sine(s) * (1 if l == 0 else query_scale(x_l))`` with ``sine`` the (y, x) sine embedding of ``s`` (C/2
  features per coordinate, temperature 10000, 2pi) and ``x_l`` the layer input (un-normed); the positional
  query is added to the content query only in layer 0 (``is_first``).
* **Heads**: the decoder output LayerNorm ``decoder.norm`` feeds one class head and one box MLP shared by
  every layer (``norm_feedback: true`` reproduces HF's ``auxiliary_loss=True`` variant, which also feeds the normed
  output to the next layer); ``box_l = sigmoid(box_head(norm(x_l)) + [inverse_sigmoid(s), 0, 0])`` -- offsets on
  (cx, cy) around the reference, (w, h) from the MLP alone; no refinement. Focal classification (criterion).

Query-group contract of :meth:`ConditionalDETR.decode` (Co-DETR decodes extra groups through it):
``content`` (B, Q, C), ``pos`` (B, Q, C) **required**, ``reference`` (B, Q, 2) normalised (cx, cy) or
(B, Q, 4) normalised cxcywh of which only ``[..., :2]`` is used; ``self_attn_mask`` (bool, True = blocked,
(Q, Q) or (B * heads, Q, Q)) is honoured. ``DecoderOutputs.references`` are the (L, B, Q, 2) points used.

State-dict layout (prefix ``variant.`` in a detector)::

    encoder.layers.{i}.self_attn.{in_proj_weight,in_proj_bias,out_proj.*}    nn.MultiheadAttention
    encoder.layers.{i}.{norm1,norm2,ffn.fc1,ffn.fc2}.*
    decoder.layers.{i}.self_attn.{q_content,q_pos,k_content,k_pos,v,out_proj}.*
    decoder.layers.{i}.cross_attn.{q_content,k_content,k_pos,v,q_pos_sine,out_proj}.*   (+ q_pos in layer 0)
    decoder.layers.{i}.{norm1,norm2,norm3,ffn.fc1,ffn.fc2}.*
    decoder.{norm,query_scale.layers.{0,1},ref_point_head.layers.{0,1}}.*
    class_heads.0.*, box_heads.0.layers.{0,1,2}.*                             shared by every layer
    query_embedding.weight                                                    (Q, C) positional queries
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from codetr.core.interfaces import DecoderOutputs, Memory, QueryGroup
from codetr.core.registry import Component
from codetr.core.structures import Batch
from codetr.ops.position import sine_box_embedding
from codetr.variants.base import with_shared_fallbacks
from codetr.variants.conditional_layers import ConditionalDecoder, ConditionalDecoderLayer
from codetr.variants.layers import MLP, apply_box_delta, init_prediction_heads
from codetr.variants.single_scale import SINGLE_SCALE_FALLBACKS, SingleScaleConfig, SingleScaleVariant

__all__ = ["ConditionalDETRConfig", "ConditionalDETR", "build", "COMPONENT"]


class ConditionalDETRConfig(SingleScaleConfig):
    """Conditional-DETR (defaults: the original R50 recipe: 6 + 6 layers, 8 heads, FFN 2048, dropout 0.1, ReLU,
    PE temperature 10000, focal prior 0.01). Shared fields are injected by the recipe (``num_levels`` = 1)."""

    type: Literal["conditional_detr"] = "conditional_detr"

    #: HF ``transformers`` ``ConditionalDetr`` with ``auxiliary_loss=True``: the decoder output LayerNorm is applied
    #: in place at every layer, so the next layer (and ``query_scale``) sees the *normed* output, and the last
    #: output is normed twice. Not the original (whose norm only feeds the heads); only for HF models trained so.
    norm_feedback: bool = False


class ConditionalDETR(SingleScaleVariant):
    """Conditional-DETR; see the module docstring. Build with :func:`build`."""

    def __init__(self, cfg: ConditionalDETRConfig) -> None:
        super().__init__()
        c = self._setup(cfg)
        self._build_encoder(cfg, pos_scale=False)
        layers = (ConditionalDecoderLayer(c, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.activation,
                                          with_query_pos=(i == 0)) for i in range(self.num_decoder_layers))
        self.decoder = ConditionalDecoder(layers, c, ref_point_head=MLP(c, c, 2, 2))
        self._build_heads()
        self.query_embedding = nn.Embedding(self.num_queries, c)
        self.init_weights()

    def init_weights(self) -> None:
        """Original init: xavier transformer (``ref_point_head`` / ``query_scale`` included), N(0, 1) query
        embedding (``nn.Embedding`` default), default Linear init of the heads + prior class bias + zero last
        box layer."""
        self._init_transformer()
        nn.init.normal_(self.query_embedding.weight)
        init_prediction_heads(self.class_heads, self.box_heads, self.cfg.prior_prob)

    # ------------------------------------------------------------------ queries
    def make_queries(self, memory: Memory, batch: Batch | None = None) -> list[QueryGroup]:
        """One group "main": zero content, pos = the learned query embedding, reference =
        ``sigmoid(ref_point_head(pos))`` (B, Q, 2)."""
        b = memory.memory.shape[0]
        pos = self.query_embedding.weight.unsqueeze(0).expand(b, -1, -1)
        reference = self.decoder.ref_point_head(pos).sigmoid()
        return [QueryGroup(name="main", content=torch.zeros_like(pos), reference=reference, pos=pos)]

    # ------------------------------------------------------------------ decode
    def decode(self, group: QueryGroup, memory: Memory) -> DecoderOutputs:
        """Conditional decoder over ``memory`` for one group (contract in the module docstring)."""
        if group.pos is None:
            raise ValueError(f"query group {group.name!r} has no positional queries; ConditionalDETR needs "
                             "QueryGroup.pos (B, Q, C) (its spatial query comes from the fixed reference point, its "
                             "positional query from the group)")
        self._check_group(group, memory, (2, 4))
        inputs = memory.inputs
        ref = group.reference[..., :2]
        x, pos = group.content, group.pos
        sine = sine_box_embedding(ref, num_feats=self.hidden_dim // 2, temperature=10000, scale=2 * math.pi,
                                  order="yxwh").to(x.dtype)
        feedback, last = self.cfg.norm_feedback, self.num_decoder_layers - 1
        logits, boxes, hidden = [], [], []
        for lid, layer in enumerate(self.decoder.layers):
            query_sine = sine if lid == 0 else sine * self.decoder.query_scale(x)
            x = layer(x, pos, query_sine, memory.memory, inputs.pos, inputs.padding_mask, group.self_attn_mask)
            h = self.decoder.norm(x)
            if feedback:  # HF auxiliary_loss=True semantics (see ConditionalDETRConfig.norm_feedback)
                x = h
                h = self.decoder.norm(h) if lid == last else h
            logits.append(self.class_head(h))
            boxes.append(apply_box_delta(self.box_head(h), ref).sigmoid())
            hidden.append(h)
        n = len(hidden)
        return DecoderOutputs(logits=torch.stack(logits), boxes=torch.stack(boxes), hidden=torch.stack(hidden),
                              references=ref.unsqueeze(0).expand(n, *ref.shape))


def build(cfg: ConditionalDETRConfig) -> ConditionalDETR:
    """Build the variant; shared fields left unset fall back to the R50-C5 defaults (num_classes is required)."""
    return ConditionalDETR(with_shared_fallbacks(cfg, SINGLE_SCALE_FALLBACKS))


COMPONENT = Component(config=ConditionalDETRConfig, build=build,
                      summary="Conditional-DETR (single-scale C5, conditional cross-attention, fixed 2-D references)")
