"""DAB-DETR (Liu et al., ICLR 2022: dynamic anchor boxes) as a :class:`~codetr.core.interfaces.DETRVariant`.

Numerics follow the original repository (``IDEA-Research/DAB-DETR``, ``models/DAB_DETR/transformer.py`` /
``DABDETR.py``, default ``cond_elewise`` query scale, ``modulate_hw_attn``, shared box head, no patterns);
HF ``transformers`` ``DabDetrForObjectDetection`` is the parity oracle (``tests/variants/test_hf_dab_parity.py``,
differences in ``docs/deviations.md``). It shares every layer with Conditional-DETR
(:mod:`codetr.variants.conditional_layers`, :mod:`codetr.variants.single_scale`):

* **Features / encoder**: one C5 map (16 with a dilated C5) through a 1x1 conv with bias; the DETR encoder
  with DAB's ``encoder.query_scale``: layer ``i`` uses ``pos * MLP(x_i)`` as its positional encoding; image
  sine PE with **temperature 20** (H and W), normalised, scale 2pi, no offset. FFNs use **PReLU**.
* **Queries**: ``num_queries`` learned 4-D anchors ``anchor_embedding`` (Q, 4) in inverse-sigmoid space with
  zero content; the reference is ``sigmoid(anchor)`` (normalised cxcywh).
* **Decoder**: at every layer ``l`` with reference ``r_l`` (normalised cxcywh):
  ``sine_l = sine(r_l)`` (4 x C/2 features in the original (y, x, w, h) order, temperature 10000, 2pi);
  positional query ``p_l = ref_point_head(sine_l)`` (MLP 2C -> C -> C); spatial query
  ``s_l = sine_l[..., :C] * (1 if l == 0 else query_scale(x_l))``, then **width/height modulation**
  (``ref_anchor_head``): with ``(w_ref, h_ref) = sigmoid(ref_anchor_head(x_l))`` the x half of ``s_l``
  (channels C/2..C) is scaled by ``w_ref / w_l`` and the y half (0..C/2) by ``h_ref / h_l``. The layer is
  the conditional decoder layer (positional query added to the content query only in layer 0 unless
  ``keep_query_pos``).
* **Anchor update** with the **shared** box head: ``r_{l+1} = sigmoid(box_head(x_{l+1}) + inverse_sigmoid(r_l))``
  from the un-normed layer output, **detached** before it feeds layer ``l + 1``; the predictions use the
  normed output and the *undetached* reference: ``box_l = sigmoid(box_head(norm(x_{l+1})) +
  inverse_sigmoid(r_l))`` (so layer ``l``'s box loss also reaches layer ``l - 1``'s update, as in the original).
* **Anchor init** (``anchor_init``): ``"normal"`` = ``nn.Embedding``'s N(0, 1) (the original default);
  ``"uniform_xy"`` = the centres drawn uniform(0, 1) and stored as their inverse sigmoid (w, h stay normal).
  The original ``--random_refpoints_xy`` flag also tries to *freeze* the centres, but it sets
  ``requires_grad`` on a slice of ``.data``, which is a no-op: they are trained like everything else. So
  ``uniform_xy`` is exactly what that flag does in effect; codetr has no freeze.

Query-group contract of :meth:`DABDETR.decode`: ``reference`` (B, Q, 4) normalised cxcywh anchors,
``pos`` must be None (positions derive from the anchor at every layer), ``content`` (B, Q, C),
``self_attn_mask`` honoured. ``DecoderOutputs.references`` (L, B, Q, 4) are the anchors each layer refined.

State-dict layout (prefix ``variant.``): Conditional-DETR's (:mod:`codetr.variants.conditional`) plus
``encoder.query_scale.layers.{0,1}``, ``decoder.ref_point_head`` (2C -> C -> C), ``decoder.ref_anchor_head``
(C -> C -> 2), ``{en,de}coder.layers.{i}.ffn.act.weight`` (PReLU) and ``anchor_embedding.weight`` (Q, 4)
instead of ``query_embedding``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from codetr.core.interfaces import DecoderOutputs, Memory, QueryGroup
from codetr.core.registry import Component
from codetr.core.structures import Batch
from codetr.ops.functional import inverse_sigmoid
from codetr.ops.position import sine_box_embedding
from codetr.variants.base import with_shared_fallbacks
from codetr.variants.conditional_layers import ConditionalDecoder, ConditionalDecoderLayer
from codetr.variants.layers import MLP, init_prediction_heads
from codetr.variants.single_scale import SINGLE_SCALE_FALLBACKS, SingleScaleConfig, SingleScaleVariant

__all__ = ["DABDETRConfig", "DABDETR", "build", "COMPONENT"]


class DABDETRConfig(SingleScaleConfig):
    """DAB-DETR (defaults: the original R50 recipe: dropout 0, PReLU, PE temperature 20, FFN 2048, focal prior
    0.01). Shared fields are injected by the recipe (``num_levels`` = 1)."""

    type: Literal["dab_detr"] = "dab_detr"

    dropout: float = Field(0.0, ge=0, lt=1, description="every dropout (official DAB-DETR: 0)")
    activation: Literal["relu", "prelu"] = "prelu"
    pe_temperature: float = Field(20.0, gt=0, description="image sine PE temperature (H and W; DAB-DETR: 20)")
    #: add the positional query to the content query in every decoder layer, not only the first (original flag)
    keep_query_pos: bool = False
    #: width/height-modulated positional attention (``ref_anchor_head``; original default on)
    modulate_hw_attn: bool = True
    #: anchor initialisation: "normal" (N(0, 1), original default) or "uniform_xy" (centres uniform(0, 1) in
    #: sigmoid space: the effective behaviour of the original ``random_refpoints_xy``, whose freeze is a no-op)
    anchor_init: Literal["normal", "uniform_xy"] = "normal"


class DABDETR(SingleScaleVariant):
    """DAB-DETR; see the module docstring. Build with :func:`build`."""

    def __init__(self, cfg: DABDETRConfig) -> None:
        super().__init__()
        c = self._setup(cfg)
        self._build_encoder(cfg, pos_scale=True)
        layers = (ConditionalDecoderLayer(c, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.activation,
                                          with_query_pos=(i == 0 or cfg.keep_query_pos))
                  for i in range(self.num_decoder_layers))
        self.decoder = ConditionalDecoder(layers, c, ref_point_head=MLP(2 * c, c, c, 2),
                                          ref_anchor_head=MLP(c, c, 2, 2) if cfg.modulate_hw_attn else None)
        self._build_heads()
        self.anchor_embedding = nn.Embedding(self.num_queries, 4)
        self.init_weights()

    def init_weights(self) -> None:
        """Original init: xavier transformer (encoder ``query_scale`` and the decoder heads included), anchors
        per ``anchor_init``, default Linear init of the heads + prior class bias + zero last box layer."""
        self._init_transformer()
        w = self.anchor_embedding.weight
        nn.init.normal_(w)
        if self.cfg.anchor_init == "uniform_xy":
            with torch.no_grad():
                w[:, :2] = inverse_sigmoid(torch.rand_like(w[:, :2]))
        init_prediction_heads(self.class_heads, self.box_heads, self.cfg.prior_prob)

    # ------------------------------------------------------------------ queries
    def make_queries(self, memory: Memory, batch: Batch | None = None) -> list[QueryGroup]:
        """One group "main": zero content, reference = ``sigmoid(anchor_embedding)`` (B, Q, 4), pos None."""
        b = memory.memory.shape[0]
        reference = self.anchor_embedding.weight.sigmoid().unsqueeze(0).expand(b, -1, -1)
        content = reference.new_zeros(b, self.num_queries, self.hidden_dim)
        return [QueryGroup(name="main", content=content, reference=reference)]

    # ------------------------------------------------------------------ decode
    def spatial_query(self, sine: Tensor, x: Tensor, ref: Tensor, layer: int) -> Tensor:
        """(B, Q, 2C) anchor sine embedding -> (B, Q, C) spatial query of decoder layer ``layer`` (input ``x``,
        anchors ``ref``): the (y, x) part times ``query_scale(x)`` (from layer 1 on), then the w/h modulation."""
        c = self.hidden_dim
        s = sine[..., :c]
        if layer > 0:
            s = s * self.decoder.query_scale(x)
        if self.decoder.ref_anchor_head is not None:
            wh = self.decoder.ref_anchor_head(x).sigmoid()
            s_y = s[..., :c // 2] * (wh[..., 1] / ref[..., 3]).unsqueeze(-1)
            s_x = s[..., c // 2:] * (wh[..., 0] / ref[..., 2]).unsqueeze(-1)
            s = torch.cat([s_y, s_x], -1)
        return s

    def decode(self, group: QueryGroup, memory: Memory) -> DecoderOutputs:
        """DAB decoder over ``memory`` for one group (contract in the module docstring)."""
        if group.pos is not None:
            raise ValueError(f"query group {group.name!r} has explicit positional queries; DAB-DETR derives them "
                             "from the anchor box at every layer (pos must be None)")
        if group.reference.shape[-1] != 4:
            raise ValueError(f"query group {group.name!r}: DAB-DETR needs 4-D anchors (B, Q, 4) normalised cxcywh, "
                             f"got reference of shape {tuple(group.reference.shape)}")
        self._check_group(group, memory, (4,))
        inputs = memory.inputs
        x = group.content
        ref = group.reference
        ref_pred = ref  # the undetached refined anchor of the previous layer (predictions build on it)
        logits, boxes, hidden, refs = [], [], [], []
        for lid, layer in enumerate(self.decoder.layers):
            sine = sine_box_embedding(ref, num_feats=self.hidden_dim // 2, temperature=10000, scale=2 * math.pi,
                                      order="yxwh").to(x.dtype)
            query_pos = self.decoder.ref_point_head(sine)
            query_sine = self.spatial_query(sine, x, ref, lid)
            x = layer(x, query_pos, query_sine, memory.memory, inputs.pos, inputs.padding_mask, group.self_attn_mask)
            h = self.decoder.norm(x)
            logits.append(self.class_head(h))
            boxes.append((self.box_head(h) + inverse_sigmoid(ref_pred)).sigmoid())
            hidden.append(h)
            refs.append(ref_pred)
            new_ref = (self.box_head(x) + inverse_sigmoid(ref)).sigmoid()
            ref_pred, ref = new_ref, new_ref.detach()
        return DecoderOutputs(logits=torch.stack(logits), boxes=torch.stack(boxes), hidden=torch.stack(hidden),
                              references=torch.stack(refs))


def build(cfg: DABDETRConfig) -> DABDETR:
    """Build the variant; shared fields left unset fall back to the R50-C5 defaults (num_classes is required)."""
    return DABDETR(with_shared_fallbacks(cfg, SINGLE_SCALE_FALLBACKS))


COMPONENT = Component(config=DABDETRConfig, build=build,
                      summary="DAB-DETR (single-scale C5, learned 4-D anchors refined per layer, w/h-modulated "
                              "conditional cross-attention)")
