"""Deformable-DETR family as a :class:`~codetr.core.interfaces.DETRVariant`.

One module covers

* Deformable-DETR (one-stage: learned ``query_embedding`` split into position / content, 2-D reference
  points ``sigmoid(Linear(pos))``),
* ``+ with_box_refine`` (per-layer heads, references refined layer by layer, detached between layers),
* ``+ two_stage`` (every encoder token is a proposal; top-k by the class-0 logit of the encoder head;
  ``pos_trans`` + ``pos_trans_norm`` on the sine embedding of the proposals gives position and content),
* ``+ mixed_selection`` (content = learned ``query_embedding``, position from the proposals) and
  ``+ look_forward_twice`` (layer ``l``'s box is built on layer ``l-1``'s *undetached* refined box),

i.e. Deformable-DETR++ (``preset: deformable_detr_pp``), which is the one-to-one branch of official
Co-Deformable-DETR. Numerics follow the official Sense-X Co-DETR (mmdet 2.25) and mmdet 3.x implementations
(see ``tests/variants/test_deformable_parity.py`` and the fixture READMEs).

State-dict layout (prefix ``variant.`` in a detector)::

    level_embed                                   (L, C)
    encoder.layers.{i}.self_attn.{sampling_offsets,attention_weights,value_proj,output_proj}.*
    encoder.layers.{i}.{norm1,norm2,ffn.fc1,ffn.fc2}.*
    decoder.layers.{i}.self_attn.{in_proj_weight,in_proj_bias,out_proj.*}
    decoder.layers.{i}.cross_attn.*  decoder.layers.{i}.{norm1,norm2,norm3,ffn.fc1,ffn.fc2}.*
    class_heads.{k}.*  box_heads.{k}.layers.{0,1,2}.*   k = decoder layer; k = num_decoder_layers: encoder
                                                        proposal head (two-stage); a single k = 0 when shared
    query_embedding.weight                        (Q, 2C) one-stage, (Q, C) mixed selection, absent otherwise
    reference_points.*                            one-stage only (Linear C -> 2)
    enc_output.*, enc_output_norm.*, pos_trans.*, pos_trans_norm.*      two-stage only

Two-stage ``Memory.extras`` (keys = the ``EXTRAS_*`` constants of :mod:`codetr.core.interfaces`, the same meaning
as in DINO): ``enc_logits`` (B, S, C) / ``enc_boxes`` (B, S, 4) the proposals the encoder loss trains, for
Deformable-DETR every token (``SetCriterion(enc_loss="binary")``; ``enc_logits`` is ``enc_logits_all``),
``enc_logits_all`` (B, S, C), ``enc_boxes_unact_all`` (B, S, 4), ``enc_proposals_unact`` (B, S, 4) (+inf where
invalid), ``enc_valid`` (B, S), ``topk_indices`` (B, k) by the class-0 logit and ``topk_boxes_unact`` (B, k, 4)
detached (the initial references). The encoder side, ``prepare`` / ``encode`` and the proposal generation are the
shared :class:`~codetr.variants.base.DeformableVariant`; this module adds the one-stage / two-stage queries, the
refinement options and the decoder loop.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from codetr.core.interfaces import EXTRAS_TOPK_BOXES_UNACT, DecoderOutputs, Memory, QueryGroup
from codetr.core.registry import Component, ComponentConfig
from codetr.core.structures import Batch
from codetr.ops.position import sine_box_embedding
from codetr.variants.base import DeformableVariant, with_shared_fallbacks
from codetr.variants.layers import (DeformableDecoderLayer, LayerStack, apply_box_delta, init_prediction_heads,
                                    stack_references)

__all__ = ["PRESETS", "DeformableDETRConfig", "DeformableDETR", "build", "COMPONENT"]

#: Field values a ``preset`` fills in. Precedence: a field given explicitly in the config always wins over
#: the preset, and the preset wins over the field's default. ``num_queries`` is a recipe-level (shared) field,
#: so the preset never sets it during validation; it is only the fallback used by :func:`build` when the
#: recipe did not inject one (Deformable-DETR++ uses 300 queries).
PRESETS: dict[str, dict[str, Any]] = {
    "deformable_detr_pp": {
        "with_box_refine": True,
        "two_stage": True,
        "mixed_selection": True,
        "look_forward_twice": True,
        "ffn_dim": 2048,
        "dropout": 0.0,
    },
}
_PRESET_NUM_QUERIES = {"deformable_detr_pp": 300}

#: Fallbacks for shared fields when a config is built outside a recipe (unit tests, notebooks).
_SHARED_FALLBACKS = {"hidden_dim": 256, "num_levels": 4, "num_decoder_layers": 6, "num_queries": 300}


class DeformableDETRConfig(ComponentConfig):
    """Deformable-DETR (+refine, +two-stage, ++ tricks).

    Shared fields (``hidden_dim``, ``num_queries``, ``num_levels``, ``num_classes``, ``num_decoder_layers``) are
    injected by the recipe. ``preset: deformable_detr_pp`` = refine + two-stage + mixed selection +
    look-forward-twice + FFN 2048 + dropout 0 (and 300 queries if the recipe gives none); explicitly set
    fields override the preset.
    """

    type: Literal["deformable_detr"] = "deformable_detr"
    preset: Literal["deformable_detr_pp"] | None = None

    hidden_dim: int | None = None
    num_queries: int | None = None
    num_levels: int | None = None
    num_classes: int | None = None
    num_decoder_layers: int | None = None

    num_encoder_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1

    with_box_refine: bool = False
    two_stage: bool = False
    mixed_selection: bool = False
    look_forward_twice: bool = False
    #: None = official behaviour: one head shared by all layers without box refinement, per-layer heads with it.
    share_heads: bool | None = None

    pe_temperature: float = 10000.0
    #: Sine PE offset added to the cumulative pixel index before normalising. -0.5 (pixel centres) is what every
    #: official Deformable-DETR family model uses: the original repo (``models/position_encoding.py`` subtracts
    #: 0.5), mmdet 2.x / 3.x Deformable configs, Sense-X Co-Deformable-DETR, H-DETR, detrex. 0.0 = DETR / DINO.
    pe_offset: float = -0.5
    #: Encoder proposals kept as queries (two-stage); None = num_queries.
    two_stage_num_proposals: int | None = None
    #: Rank invalid proposals (padding, or outside (0.01, 0.99)) last in the two-stage top-k. The official code
    #: ranks them by their (bias-only) logit, so a padded token can be picked and the result then depends on
    #: how much padding the batch has; masking keeps "batch size doesn't change the result". Numerically equal
    #: to the official code whenever it would not select an invalid proposal (all fixtures).
    two_stage_mask_invalid: bool = True
    #: Activation checkpointing of the first N encoder layers (official ``with_cp``; Co-DINO uses 4-6).
    encoder_checkpoint_layers: int = Field(0, ge=0)
    prior_prob: float = 0.01

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            preset = PRESETS.get(data["preset"])
            if preset is not None:  # unknown names are reported by the Literal check
                data = {**preset, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> "DeformableDETRConfig":
        if self.mixed_selection and not self.two_stage:
            raise ValueError("mixed_selection needs two_stage: true (positions come from encoder proposals)")
        if self.look_forward_twice and not self.with_box_refine:
            raise ValueError("look_forward_twice needs with_box_refine: true")
        if self.share_heads and self.with_box_refine:
            raise ValueError("share_heads: true with with_box_refine is not a Deformable-DETR configuration; "
                             "refinement uses one head per decoder layer")
        if self.mixed_selection and self.two_stage_num_proposals is not None and self.num_queries is not None \
                and self.two_stage_num_proposals != self.num_queries:
            raise ValueError("with mixed_selection every proposal gets a learned content query, so "
                             "two_stage_num_proposals must equal num_queries")
        return self


class DeformableDETR(DeformableVariant):
    """Deformable-DETR family; see the module docstring. Build with :func:`build`.

    The encoder side, ``prepare`` / ``encode`` and the two-stage proposals come from
    :class:`~codetr.variants.base.DeformableVariant`; proposals are ranked by the first (class-agnostic)
    logit and the encoder loss trains every token.
    """

    proposal_score = "class0"
    proposal_loss_on = "all"

    def __init__(self, cfg: DeformableDETRConfig) -> None:
        super().__init__()
        c = self._setup(cfg)
        self.with_box_refine = cfg.with_box_refine
        self.two_stage = cfg.two_stage
        self.mixed_selection = cfg.mixed_selection
        self.look_forward_twice = cfg.look_forward_twice
        self.share_heads = (not cfg.with_box_refine) if cfg.share_heads is None else cfg.share_heads
        self.num_proposals = cfg.two_stage_num_proposals or self.num_queries
        if self.mixed_selection and self.num_proposals != self.num_queries:
            raise ValueError(f"mixed_selection: two_stage_num_proposals ({self.num_proposals}) must equal "
                             f"num_queries ({self.num_queries}), one learned content query per proposal")

        layer_args = self._build_encoder(cfg)
        self.decoder = LayerStack(DeformableDecoderLayer(*layer_args) for _ in range(self.num_decoder_layers))
        self._build_heads(1 if self.share_heads else self.num_decoder_layers + int(self.two_stage))
        if self.two_stage:
            self._build_enc_output()
            self.pos_trans = nn.Linear(2 * c, 2 * c)
            self.pos_trans_norm = nn.LayerNorm(2 * c)
            self.query_embedding = nn.Embedding(self.num_queries, c) if self.mixed_selection else None
            self.reference_points = None
        else:
            self.query_embedding = nn.Embedding(self.num_queries, 2 * c)
            self.reference_points = nn.Linear(c, 2)
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Official initialisation (Deformable-DETR / mmdet ``DeformableDETRHead.init_weights``)."""
        self._init_encoder_weights()
        if self.two_stage:
            nn.init.xavier_uniform_(self.pos_trans.weight)
        else:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        init_prediction_heads(self.class_heads, self.box_heads, self.cfg.prior_prob)
        # w, h bias -2 on the (shared, or first when refining) box head; reset to 0 for two-stage because the
        # proposal already carries a size.
        nn.init.constant_(self.box_heads[0].layers[-1].bias[2:], -2.0)
        if self.two_stage:
            for head in self.box_heads:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)

    # ------------------------------------------------------------------ queries
    def make_queries(self, memory: Memory, batch: Batch | None = None) -> list[QueryGroup]:
        b = memory.memory.shape[0]
        c = self.hidden_dim
        if self.two_stage:
            reference = memory.extras[EXTRAS_TOPK_BOXES_UNACT].sigmoid()
            emb = self.pos_trans_norm(self.pos_trans(self.proposal_embedding(reference)))
            pos, content = emb.split(c, dim=-1)
            if self.mixed_selection:
                content = self.query_embedding.weight.unsqueeze(0).expand(b, -1, -1)
        else:
            pos, content = self.query_embedding.weight.split(c, dim=-1)
            pos = pos.unsqueeze(0).expand(b, -1, -1)
            content = content.unsqueeze(0).expand(b, -1, -1)
            reference = self.reference_points(pos).sigmoid()
        return [QueryGroup(name="main", content=content, reference=reference, pos=pos)]

    def proposal_embedding(self, boxes: Tensor) -> Tensor:
        """(B, Q, 4) normalised cxcywh -> (B, Q, 4 * C/2) sine embedding (cx, cy, w, h), temperature 10000, 2pi."""
        return sine_box_embedding(boxes, num_feats=self.hidden_dim // 2, temperature=10000, scale=2 * math.pi,
                                  order="xywh")

    # ------------------------------------------------------------------ decode
    def decode(self, group: QueryGroup, memory: Memory) -> DecoderOutputs:
        if group.pos is None:
            raise ValueError(f"query group {group.name!r} has no positional queries; DeformableDETR needs "
                             "QueryGroup.pos (it does not derive positions from the reference per layer)")
        inputs = memory.inputs
        vr = inputs.valid_ratios
        x, pos = group.content, group.pos
        ref = group.reference
        prev = ref  # look-forward-twice: the undetached refined reference of the previous layer
        logits, boxes, hidden, refs = [], [], [], []
        for lid, layer in enumerate(self.decoder.layers):
            scale = torch.cat([vr, vr], -1) if ref.shape[-1] == 4 else vr
            x = layer(x, pos, ref[:, :, None] * scale[:, None], memory.memory, inputs.spatial_shapes,
                      inputs.padding_mask, group.self_attn_mask)
            delta = self.box_head(lid)(x)
            logits.append(self.class_head(lid)(x))
            hidden.append(x)
            refs.append(ref)
            if self.with_box_refine:
                new_ref = apply_box_delta(delta, ref).sigmoid()
                box = apply_box_delta(delta, prev).sigmoid() if self.look_forward_twice else new_ref
                prev, ref = new_ref, new_ref.detach()
            else:
                box = apply_box_delta(delta, ref).sigmoid()
            boxes.append(box)
        return DecoderOutputs(logits=torch.stack(logits), boxes=torch.stack(boxes), hidden=torch.stack(hidden),
                              references=stack_references(refs))


def build(cfg: DeformableDETRConfig) -> DeformableDETR:
    """Build the variant; shared fields left unset fall back to Deformable-DETR defaults (num_classes is required)."""
    fallbacks = dict(_SHARED_FALLBACKS)
    if cfg.preset in _PRESET_NUM_QUERIES:
        fallbacks["num_queries"] = _PRESET_NUM_QUERIES[cfg.preset]
    return DeformableDETR(with_shared_fallbacks(cfg, fallbacks))


COMPONENT = Component(config=DeformableDETRConfig, build=build,
                      summary="Deformable-DETR (+box refine, +two-stage, ++ mixed selection / look-forward-twice)")
