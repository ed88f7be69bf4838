"""The skeleton the deformable DETR variants share: shared-field checks and fallbacks, the multi-scale
deformable encoder side (sine PE + level embedding + encoder layers), ``prepare`` / ``encode``, two-stage
proposals, prediction heads and their init.

A variant subclasses :class:`DeformableVariant` and, in its ``__init__``, calls the ``_build_*`` steps in
this order (the order in which parameters are created and registered, hence the state-dict layout and the
RNG draws of a seeded build)::

    c = self._setup(cfg)                        # require_shared + hidden_dim, num_levels, ... attributes
    layer_args = self._build_encoder(cfg)       # positional_encoding, level_embed, encoder.layers.{i}
    self.decoder = ...                          # variant-specific (DeformableDecoderLayer(*layer_args) ...)
    self._build_heads(n)                        # class_heads.{k}, box_heads.{k}
    self._build_enc_output()                    # enc_output, enc_output_norm (two-stage only)
    ...                                         # variant-specific parameters

and, in ``init_weights``, :meth:`DeformableVariant._init_encoder_weights` first, then its own RNG-drawing
inits, then :func:`~codetr.variants.layers.init_prediction_heads` and constant tweaks. What differs between
variants is declared, not re-implemented: ``two_stage``, ``num_proposals``, ``proposal_score`` (``"class0"``
/ ``"max"``) and ``proposal_loss_on`` (``"all"`` / ``"topk"``), see
:func:`~codetr.variants.layers.two_stage_proposals`.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Protocol, TypeVar

import torch
from torch import Tensor, nn

from codetr.core.interfaces import DETRVariant, EncoderInputs, Memory
from codetr.core.registry import ComponentConfig
from codetr.ops.position import SinePositionalEncoding
from codetr.variants.layers import (MLP, DeformableEncoderLayer, LayerStack, flatten_levels, init_transformer_weights,
                                    prediction_heads, run_encoder, two_stage_proposals)

__all__ = ["VARIANT_SHARED_FIELDS", "DeformableEncoderFields", "DeformableVariant", "with_shared_fallbacks"]

#: The shared (recipe-injected) fields every DETR variant needs.
VARIANT_SHARED_FIELDS: tuple[str, ...] = ("hidden_dim", "num_levels", "num_decoder_layers", "num_queries",
                                          "num_classes")

_Cfg = TypeVar("_Cfg", bound=ComponentConfig)


def with_shared_fallbacks(cfg: _Cfg, fallbacks: dict[str, int]) -> _Cfg:
    """``cfg`` with every shared field it leaves unset taken from ``fallbacks`` (a variant's defaults when
    built outside a recipe: unit tests, notebooks), re-validated; ``num_classes`` has no fallback and must
    be set (:meth:`~codetr.core.registry.ComponentConfig.require_shared` raises otherwise)."""
    cfg.require_shared("num_classes")
    update = {k: v for k, v in fallbacks.items() if getattr(cfg, k) is None}
    if not update:
        return cfg
    return type(cfg).model_validate({**cfg.model_dump(), **update})


class DeformableEncoderFields(Protocol):
    """The config fields :class:`DeformableVariant` reads (both ``DeformableDETRConfig`` and ``DINOConfig``
    declare them; the defaults differ per variant)."""

    hidden_dim: int | None
    num_queries: int | None
    num_levels: int | None
    num_classes: int | None
    num_decoder_layers: int | None
    num_encoder_layers: int
    num_heads: int
    num_points: int
    ffn_dim: int
    dropout: float
    pe_temperature: float
    pe_offset: float
    two_stage_mask_invalid: bool
    encoder_checkpoint_layers: int
    prior_prob: float

    def require_shared(self, *names: str) -> None: ...


class DeformableVariant(DETRVariant):
    """Encoder side + two-stage proposals of the deformable DETR variants (see the module docstring).

    Class-level switches a subclass sets (or overrides per instance):

    * ``two_stage``: ``encode`` adds the proposal tensors to ``Memory.extras`` (keys: the ``EXTRAS_*``
      constants of :mod:`codetr.core.interfaces`);
    * ``proposal_score`` / ``proposal_loss_on``: see :func:`~codetr.variants.layers.two_stage_proposals`;
    * ``share_heads``: one class / box head for every index (:meth:`class_head`, :meth:`box_head`).

    ``num_proposals`` (k before clamping to the token count) defaults to ``num_queries``.
    """

    two_stage: bool = True
    share_heads: bool = False
    proposal_score: ClassVar[Literal["class0", "max"]] = "max"
    proposal_loss_on: ClassVar[Literal["all", "topk"]] = "topk"

    cfg: DeformableEncoderFields
    num_queries: int
    num_classes: int
    num_heads: int
    num_proposals: int
    positional_encoding: SinePositionalEncoding
    level_embed: nn.Parameter
    encoder: LayerStack
    decoder: nn.Module
    class_heads: nn.ModuleList
    box_heads: nn.ModuleList
    enc_output: nn.Linear
    enc_output_norm: nn.LayerNorm

    # ------------------------------------------------------------------ construction steps
    def _setup(self, cfg: DeformableEncoderFields) -> int:
        """Check the shared fields (``require_shared``), keep ``cfg`` and set ``hidden_dim``, ``num_levels``,
        ``num_decoder_layers``, ``num_queries``, ``num_classes``, ``num_heads``, ``num_proposals``; returns C."""
        cfg.require_shared(*VARIANT_SHARED_FIELDS)
        self.cfg = cfg
        c = self.hidden_dim = int(cfg.hidden_dim)
        if c % 2:
            raise ValueError("hidden_dim must be even (half sine features per axis)")
        self.num_levels = int(cfg.num_levels)
        self.num_decoder_layers = int(cfg.num_decoder_layers)
        self.num_queries = int(cfg.num_queries)
        self.num_classes = int(cfg.num_classes)
        self.num_heads = cfg.num_heads
        self.num_proposals = self.num_queries
        return c

    def _build_encoder(self, cfg: DeformableEncoderFields) -> tuple[int, int, int, int, int, float]:
        """Create ``positional_encoding`` (normalised sine PE, C/2 features per axis, ``cfg.pe_temperature``,
        ``cfg.pe_offset``, scale 2pi), ``level_embed`` (L, C) (uninitialised until ``init_weights``) and
        ``encoder`` (``cfg.num_encoder_layers`` :class:`DeformableEncoderLayer`), in that order.

        Returns the layer arguments ``(C, heads, L, points, ffn_dim, dropout)`` for the decoder layers.
        """
        c = self.hidden_dim
        self.positional_encoding = SinePositionalEncoding(
            num_feats=c // 2, temperature=cfg.pe_temperature, normalize=True, scale=2 * math.pi, eps=1e-6,
            offset=cfg.pe_offset)
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, c))
        layer_args = (c, cfg.num_heads, self.num_levels, cfg.num_points, cfg.ffn_dim, cfg.dropout)
        self.encoder = LayerStack(DeformableEncoderLayer(*layer_args) for _ in range(cfg.num_encoder_layers))
        return layer_args

    def _build_heads(self, count: int) -> None:
        """``class_heads.{k}`` then ``box_heads.{k}``, ``k < count`` (:func:`prediction_heads`)."""
        self.class_heads, self.box_heads = prediction_heads(self.hidden_dim, self.num_classes, count)

    def _build_enc_output(self) -> None:
        """Two-stage memory projection ``enc_output`` (Linear C -> C) + ``enc_output_norm`` (LayerNorm C)."""
        self.enc_output = nn.Linear(self.hidden_dim, self.hidden_dim)
        self.enc_output_norm = nn.LayerNorm(self.hidden_dim)

    def _init_encoder_weights(self) -> None:
        """Official transformer init (:func:`init_transformer_weights` over ``encoder`` / ``decoder`` / every
        MSDA / ``level_embed``) and, two-stage, xavier-uniform ``enc_output.weight``."""
        init_transformer_weights(self.encoder, self.decoder, self.level_embed, self)
        if self.two_stage:
            nn.init.xavier_uniform_(self.enc_output.weight)

    # ------------------------------------------------------------------ heads
    def proposal_count(self) -> int:
        """Encoder proposals the two-stage top-k keeps now (before clamping to the token count):
        ``num_proposals``; a variant whose count depends on the mode overrides this."""
        return self.num_proposals

    @property
    def min_tokens(self) -> int:
        """Two-stage variants select :meth:`proposal_count` encoder tokens, so they need at least that many."""
        return self.proposal_count() if self.two_stage else 0

    def class_head(self, index: int) -> nn.Linear:
        """Class head of decoder layer ``index`` (``num_decoder_layers`` = the two-stage encoder head)."""
        return self.class_heads[0 if self.share_heads else index]

    def box_head(self, index: int) -> MLP:
        """Box head of decoder layer ``index`` (``num_decoder_layers`` = the two-stage encoder head)."""
        return self.box_heads[0 if self.share_heads else index]

    # ------------------------------------------------------------------ prepare / encode
    def prepare(self, levels: list[Tensor], masks: list[Tensor], strides: list[int]) -> EncoderInputs:
        """L maps (B, C, H_l, W_l) + padding masks -> tokens with sine PE + level embedding
        (:func:`flatten_levels`)."""
        if len(levels) != self.num_levels:
            raise ValueError(f"{type(self).__name__} was built for {self.num_levels} levels (model.num_levels), "
                             f"got {len(levels)}")
        return flatten_levels(levels, masks, strides, self.positional_encoding, self.level_embed)

    def encode(self, inputs: EncoderInputs) -> Memory:
        """Deformable encoder (first ``encoder_checkpoint_layers`` checkpointed) -> (B, S, C) memory; two-stage
        also the proposals (:meth:`encoder_proposals`) in ``Memory.extras``."""
        x = run_encoder(self.encoder.layers, inputs, self.cfg.encoder_checkpoint_layers)
        memory = Memory(memory=x, inputs=inputs)
        if self.two_stage:
            memory.extras.update(self.encoder_proposals(x, inputs))
        return memory

    def encoder_proposals(self, memory: Tensor, inputs: EncoderInputs) -> dict[str, Tensor]:
        """Two-stage proposals of the (B, S, C) memory with the encoder head (index ``num_decoder_layers``),
        ranked by ``proposal_score``, top :meth:`proposal_count` kept (:func:`two_stage_proposals`)."""
        head = self.num_decoder_layers
        return two_stage_proposals(memory, inputs, self.enc_output, self.enc_output_norm, self.class_head(head),
                                   self.box_head(head), self.proposal_count(), score=self.proposal_score,
                                   mask_invalid=self.cfg.two_stage_mask_invalid, loss_on=self.proposal_loss_on)
