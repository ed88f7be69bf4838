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
Co-Deformable-DETR, and

* ``+ num_queries_one2many`` > 0: **H-Deformable-DETR**'s hybrid matching branch (``preset: h_deformable_detr``:
  Deformable-DETR++ + 1500 one-to-many queries). During training the decoder gets ``num_queries`` one-to-one +
  ``num_queries_one2many`` one-to-many queries in one group (two-stage: the encoder top-k is their sum, 1800;
  one-to-one first), with a self-attention mask that blocks attention between the two parts in both
  directions; :meth:`DeformableDETR.split_outputs` splits them into "main" (the set criterion) and "one2many",
  whose loss (:meth:`DeformableDETR.group_loss`) matches the GT **repeated** ``k_one2many`` times with the same
  Hungarian matcher on every decoder layer (``[d{i}.]loss_*_one2many`` x ``lambda_one2many``). At inference
  only the one-to-one queries exist (two-stage top-k = ``num_queries``; the learned content queries of mixed
  selection are the first ``num_queries`` rows), so predictions do not depend on the one-to-many part. With
  ``num_queries_one2many: 0`` the module is exactly Deformable-DETR++ (same parameters, same computation). Numerics follow the official Sense-X Co-DETR (mmdet 2.25) and mmdet 3.x implementations
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

from codetr.core.interfaces import EXTRAS_TOPK_BOXES_UNACT, Criterion, DecoderOutputs, Memory, QueryGroup
from codetr.core.registry import Component, ComponentConfig
from codetr.core.structures import Batch
from codetr.ops.position import sine_box_embedding
from codetr.variants.base import DeformableVariant, with_shared_fallbacks
from codetr.variants.layers import (DeformableDecoderLayer, LayerStack, apply_box_delta, init_prediction_heads,
                                    slice_outputs, stack_references)

__all__ = ["PRESETS", "ONE2MANY", "DeformableDETRConfig", "DeformableDETR", "hybrid_attention_mask", "build",
           "COMPONENT"]

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
#: H-Deformable-DETR = Deformable-DETR++ + the hybrid one-to-many branch (H-DETR ``r50_hybrid_branch_lambda1``
#: configs: 300 one-to-one + 1500 one-to-many queries, k = 6, lambda 1).
PRESETS["h_deformable_detr"] = {**PRESETS["deformable_detr_pp"], "num_queries_one2many": 1500, "k_one2many": 6,
                                "lambda_one2many": 1.0}
_PRESET_NUM_QUERIES = {"deformable_detr_pp": 300, "h_deformable_detr": 300}

#: Name of the one-to-many part of a hybrid group (loss suffix ``_one2many``).
ONE2MANY = "one2many"

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
    preset: Literal["deformable_detr_pp", "h_deformable_detr"] | None = None

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
    #: H-Deformable-DETR hybrid branch: extra one-to-many queries at training time (0 = off, Deformable-DETR++).
    num_queries_one2many: int = Field(0, ge=0)
    #: each GT is repeated this many times as the one-to-many targets (H-DETR ``k_one2many``)
    k_one2many: int = Field(6, ge=1)
    #: weight of the ``*_one2many`` losses (H-DETR ``lambda_one2many``)
    lambda_one2many: float = Field(1.0, ge=0)
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
        if self.num_queries_one2many and self.two_stage_num_proposals is not None:
            raise ValueError("num_queries_one2many (hybrid branch) sets the two-stage top-k itself (num_queries + "
                             "num_queries_one2many at training, num_queries at test); leave two_stage_num_proposals "
                             "unset")
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
        self.num_one2many = cfg.num_queries_one2many
        self.num_proposals = cfg.two_stage_num_proposals or self.num_queries
        if self.mixed_selection and self.num_proposals != self.num_queries:
            raise ValueError(f"mixed_selection: two_stage_num_proposals ({self.num_proposals}) must equal "
                             f"num_queries ({self.num_queries}), one learned content query per proposal")
        total = self.num_queries + self.num_one2many  # learned query rows (one-to-one first)

        layer_args = self._build_encoder(cfg)
        self.decoder = LayerStack(DeformableDecoderLayer(*layer_args) for _ in range(self.num_decoder_layers))
        self._build_heads(1 if self.share_heads else self.num_decoder_layers + int(self.two_stage))
        if self.two_stage:
            self._build_enc_output()
            self.pos_trans = nn.Linear(2 * c, 2 * c)
            self.pos_trans_norm = nn.LayerNorm(2 * c)
            self.query_embedding = nn.Embedding(total, c) if self.mixed_selection else None
            self.reference_points = None
        else:
            self.query_embedding = nn.Embedding(total, 2 * c)
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

    # ------------------------------------------------------------------ hybrid branch
    @property
    def hybrid_active(self) -> bool:
        """True while the one-to-many queries exist: a hybrid model (``num_queries_one2many`` > 0) in training."""
        return self.num_one2many > 0 and self.training

    def proposal_count(self) -> int:
        """Two-stage top-k: ``num_queries + num_queries_one2many`` while training a hybrid model (H-DETR: 1800),
        else ``num_proposals`` (300; the top 300 of the ranking are the same tokens either way)."""
        return self.num_proposals + (self.num_one2many if self.hybrid_active else 0)

    # ------------------------------------------------------------------ queries
    def make_queries(self, memory: Memory, batch: Batch | None = None) -> list[QueryGroup]:
        """The one-to-one queries ("main"); while training a hybrid model (with a batch) the one-to-many
        queries follow them in the same group with the two-way blocking mask (:func:`hybrid_attention_mask`)."""
        b = memory.memory.shape[0]
        c = self.hidden_dim
        hybrid = self.hybrid_active and batch is not None
        if self.two_stage:
            reference = memory.extras[EXTRAS_TOPK_BOXES_UNACT].sigmoid()
            if not hybrid and self.num_one2many:
                reference = reference[:, :self.num_queries]
            emb = self.pos_trans_norm(self.pos_trans(self.proposal_embedding(reference)))
            pos, content = emb.split(c, dim=-1)
            if self.mixed_selection:
                weight = self.query_embedding.weight[:reference.shape[1]] if self.num_one2many \
                    else self.query_embedding.weight
                content = weight.unsqueeze(0).expand(b, -1, -1)
        else:
            weight = self.query_embedding.weight
            weight = weight if hybrid or not self.num_one2many else weight[:self.num_queries]
            pos, content = weight.split(c, dim=-1)
            pos = pos.unsqueeze(0).expand(b, -1, -1)
            content = content.unsqueeze(0).expand(b, -1, -1)
            reference = self.reference_points(pos).sigmoid()
        n1, total = self.num_queries, content.shape[1]
        if not hybrid or total <= n1:  # (a two-stage top-k clamped to a tiny image's tokens leaves no o2m query)
            return [QueryGroup(name="main", content=content, reference=reference, pos=pos)]
        mask = hybrid_attention_mask(n1, total, device=content.device)
        return [QueryGroup(name="main", content=content, reference=reference, pos=pos, self_attn_mask=mask,
                           extras={"one2one_num_queries": n1})]

    def split_outputs(self, group: QueryGroup, outputs: DecoderOutputs) -> list[tuple[QueryGroup, DecoderOutputs]]:
        """``[("main", one-to-one part), ("one2many", the rest)]`` for a hybrid group, else the group itself."""
        n = group.extras.get("one2one_num_queries")
        if n is None:
            return [(group, outputs)]
        n = int(n)

        main = QueryGroup(name=group.name, content=group.content[:, :n], reference=group.reference[:, :n],
                          pos=group.pos[:, :n])
        many = QueryGroup(name=ONE2MANY, content=group.content[:, n:], reference=group.reference[:, n:],
                          pos=group.pos[:, n:])
        return [(main, slice_outputs(outputs, None, n)), (many, slice_outputs(outputs, n, None))]

    def group_loss(self, group: QueryGroup, outputs: DecoderOutputs, batch: Batch, criterion: Criterion
                   ) -> dict[str, Tensor]:
        """Hybrid one-to-many losses ``[d{i}.]loss_{cls,bbox,iou}_one2many``: every GT repeated ``k_one2many``
        times, Hungarian-matched per decoder layer, times ``lambda_one2many`` (H-DETR ``train_hybrid``)."""
        if group.name != ONE2MANY:
            return super().group_loss(group, outputs, batch, criterion)
        return criterion.repeated_target_loss(outputs, batch, self.cfg.k_one2many, suffix="_" + ONE2MANY,
                                              weight=self.cfg.lambda_one2many)

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


def hybrid_attention_mask(num_one2one: int, total: int, device: torch.device | None = None) -> Tensor:
    """(total, total) bool decoder self-attention mask, True = blocked: the first ``num_one2one`` queries and the
    other ``total - num_one2one`` (one-to-many) queries never attend to each other (H-DETR ``self_attn_mask``)."""
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[num_one2one:, :num_one2one] = True
    mask[:num_one2one, num_one2one:] = True
    return mask


def build(cfg: DeformableDETRConfig) -> DeformableDETR:
    """Build the variant; shared fields left unset fall back to Deformable-DETR defaults (num_classes is required)."""
    fallbacks = dict(_SHARED_FALLBACKS)
    if cfg.preset in _PRESET_NUM_QUERIES:
        fallbacks["num_queries"] = _PRESET_NUM_QUERIES[cfg.preset]
    return DeformableDETR(with_shared_fallbacks(cfg, fallbacks))


COMPONENT = Component(config=DeformableDETRConfig, build=build,
                      summary="Deformable-DETR (+box refine, +two-stage, ++ mixed selection / look-forward-twice)")
