"""The skeleton the single-scale DETR variants share (Conditional-DETR, DAB-DETR): shared-field checks, the
one-level ``prepare`` (flatten + sine PE, no level embedding), the DETR encoder, the shared prediction heads,
the official transformer init and the query-group checks of ``decode``.

A variant subclasses :class:`SingleScaleVariant` and, in its ``__init__``, calls (parameter registration
order = state-dict layout and RNG draws of a seeded build)::

    c = self._setup(cfg)                 # require_shared, num_levels == 1, hidden_dim, ... attributes
    self._build_encoder(cfg, pos_scale)  # positional_encoding, encoder.layers.{i} (+ encoder.query_scale)
    self.decoder = ConditionalDecoder(...)
    self._build_heads()                  # class_heads.0, box_heads.0 (one head shared by every layer)
    ...                                  # queries / anchors

and in ``init_weights`` :meth:`SingleScaleVariant._init_transformer` first (xavier-uniform of every >1-D
encoder / decoder weight, zero attention output biases), then its own inits, then
:func:`~codetr.variants.layers.init_prediction_heads`.

Frames: the encoder tokens are the one map (stride 32, or 16 with a dilated C5) flattened row-major;
``EncoderInputs.pos`` is the **unscaled** sine PE (normalised over the valid extent, scale 2pi, no offset,
``pe_temperature``); ``valid_ratios`` (B, 1, 2) are filled for completeness (the dense attention does not
use them). Query references are normalised to the valid image, like every codetr variant.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from codetr.core.interfaces import DETRVariant, EncoderInputs, Memory, QueryGroup
from codetr.core.registry import ComponentConfig
from codetr.ops.position import SinePositionalEncoding
from codetr.variants.base import VARIANT_SHARED_FIELDS
from codetr.variants.conditional_layers import ConditionalDecoder, SingleScaleEncoder, SingleScaleEncoderLayer
from codetr.variants.layers import MLP, prediction_heads, valid_ratio

__all__ = ["SingleScaleConfig", "SingleScaleVariant", "SINGLE_SCALE_FALLBACKS"]

#: Fallbacks for shared fields when a config is built outside a recipe (unit tests, notebooks): R50-C5 settings.
SINGLE_SCALE_FALLBACKS = {"hidden_dim": 256, "num_levels": 1, "num_decoder_layers": 6, "num_queries": 300}


class SingleScaleConfig(ComponentConfig):
    """Fields every single-scale conditional variant has (defaults: Conditional-DETR R50; DAB-DETR overrides).

    Shared fields (``hidden_dim``, ``num_queries``, ``num_levels`` = 1, ``num_classes``, ``num_decoder_layers``)
    are injected by the recipe.
    """

    hidden_dim: int | None = None
    num_queries: int | None = None
    num_levels: int | None = None
    num_classes: int | None = None
    num_decoder_layers: int | None = None

    num_encoder_layers: int = Field(6, ge=1)
    num_heads: int = Field(8, ge=1)
    ffn_dim: int = Field(2048, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1, description="every dropout (attention weights, residuals, FFN)")
    activation: Literal["relu", "prelu"] = "relu"
    pe_temperature: float = Field(10000.0, gt=0, description="image sine PE temperature (H and W)")
    prior_prob: float = Field(0.01, gt=0, lt=1, description="focal prior of the class-head bias init")


class SingleScaleVariant(DETRVariant):
    """One-level encoder side + shared heads of Conditional-DETR / DAB-DETR (see the module docstring)."""

    min_tokens = 0

    cfg: SingleScaleConfig
    num_queries: int
    num_classes: int
    num_heads: int
    positional_encoding: SinePositionalEncoding
    encoder: SingleScaleEncoder
    decoder: ConditionalDecoder
    class_heads: nn.ModuleList
    box_heads: nn.ModuleList

    # ------------------------------------------------------------------ construction steps
    def _setup(self, cfg: SingleScaleConfig) -> int:
        """Check the shared fields and ``num_levels == 1``; set ``hidden_dim``, ``num_levels``,
        ``num_decoder_layers``, ``num_queries``, ``num_classes``, ``num_heads``. Returns C."""
        cfg.require_shared(*VARIANT_SHARED_FIELDS)
        name = type(self).__name__
        if cfg.num_levels != 1:
            raise ValueError(f"{name} is a single-scale variant (one C5 map: backbone out_indices [4], neck "
                             f"num_extra_levels 0), so model.num_levels must be 1; got {cfg.num_levels}")
        c = int(cfg.hidden_dim)
        if c % 2 or c % cfg.num_heads:
            raise ValueError(f"{name}: hidden_dim ({c}) must be even and divisible by num_heads ({cfg.num_heads})")
        self.cfg = cfg
        self.hidden_dim = c
        self.num_levels = 1
        self.num_decoder_layers = int(cfg.num_decoder_layers)
        self.num_queries = int(cfg.num_queries)
        self.num_classes = int(cfg.num_classes)
        self.num_heads = cfg.num_heads
        return c

    def _build_encoder(self, cfg: SingleScaleConfig, pos_scale: bool) -> None:
        """``positional_encoding`` (C/2 features per axis, normalised, scale 2pi, eps 1e-6, offset 0,
        ``cfg.pe_temperature``) and ``encoder`` (``cfg.num_encoder_layers`` layers, DAB's ``query_scale`` with
        ``pos_scale``)."""
        c = self.hidden_dim
        self.positional_encoding = SinePositionalEncoding(
            num_feats=c // 2, temperature=cfg.pe_temperature, normalize=True, scale=2 * math.pi, eps=1e-6, offset=0.0)
        self.encoder = SingleScaleEncoder(
            (SingleScaleEncoderLayer(c, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.activation)
             for _ in range(cfg.num_encoder_layers)), c, pos_scale=pos_scale)

    def _build_heads(self) -> None:
        """``class_heads.0`` (Linear C -> classes) and ``box_heads.0`` (MLP C -> C -> C -> 4), shared by every
        decoder layer (both originals share their heads)."""
        self.class_heads, self.box_heads = prediction_heads(self.hidden_dim, self.num_classes, 1)

    def _init_transformer(self) -> None:
        """Official init (``Transformer._reset_parameters`` of both originals): xavier-uniform on every >1-D
        parameter of the encoder and the decoder (reference heads and ``query_scale`` included); the
        attention output projections start with zero bias."""
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for proj in self.decoder.attention_out_projs():
            nn.init.zeros_(proj.bias)

    # ------------------------------------------------------------------ heads
    @property
    def class_head(self) -> nn.Linear:
        return self.class_heads[0]

    @property
    def box_head(self) -> MLP:
        return self.box_heads[0]

    # ------------------------------------------------------------------ prepare / encode
    def prepare(self, levels: list[Tensor], masks: list[Tensor], strides: list[int]) -> EncoderInputs:
        """The one map (B, C, H, W) + padding mask (B, H, W) -> (B, H*W, C) tokens with the sine PE."""
        if len(levels) != 1:
            raise ValueError(f"{type(self).__name__} is single-scale: it needs exactly one feature map (backbone "
                             f"out_indices [4], neck num_extra_levels 0), got {len(levels)}")
        x, mask = levels[0], masks[0]
        b, c, h, w = x.shape
        pos = self.positional_encoding(mask).to(x.dtype)
        return EncoderInputs(
            feats=x.flatten(2).transpose(1, 2), pos=pos.flatten(2).transpose(1, 2), padding_mask=mask.flatten(1),
            spatial_shapes=[(int(h), int(w))], level_start=torch.zeros(1, dtype=torch.int64, device=x.device),
            valid_ratios=valid_ratio(mask)[:, None].to(x.dtype), strides=list(strides))

    def encode(self, inputs: EncoderInputs) -> Memory:
        """DETR encoder over the tokens (padded keys masked) -> (B, S, C) memory; no extras."""
        return Memory(memory=self.encoder(inputs.feats, inputs.pos, inputs.padding_mask), inputs=inputs)

    # ------------------------------------------------------------------ decode helpers
    def _check_group(self, group: QueryGroup, memory: Memory, ref_dims: tuple[int, ...]) -> None:
        """Shapes of a query group against the memory: content (B, Q, C), reference (B, Q, d in ref_dims),
        optional pos (B, Q, C)."""
        b, _, c = memory.memory.shape
        x, ref = group.content, group.reference
        if x.dim() != 3 or x.shape[0] != b or x.shape[2] != c:
            raise ValueError(f"query group {group.name!r}: content must be (B={b}, Q, C={c}), got {tuple(x.shape)}")
        if ref.shape[:2] != x.shape[:2] or ref.shape[-1] not in ref_dims:
            raise ValueError(f"query group {group.name!r}: reference must be (B, Q, {' or '.join(map(str, ref_dims))})"
                             f" matching content {tuple(x.shape[:2])}, got {tuple(ref.shape)}")
        if group.pos is not None and group.pos.shape != x.shape:
            raise ValueError(f"query group {group.name!r}: pos must have the content's shape {tuple(x.shape)}, got "
                             f"{tuple(group.pos.shape)}")
