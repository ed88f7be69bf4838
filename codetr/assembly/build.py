"""Recipe ``model`` section -> :class:`~codetr.core.detector.Detector` (builders kept apart from classes).

This is the only place that knows which concrete modules make a detector: components come from the
registry by ``type``, the criterion, the Co-DETR branch and post-processing are wired here.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from codetr.core.config.schema import ModelConfig
from codetr.core.detector import Detector
from codetr.core.registry import registry
from codetr.heads.adapter import MultiScaleAdapter, SingleScaleAdapter
from codetr.heads.collaborative import CollaborativeBranch
from codetr.heads.criterion import SetCriterion
from codetr.variants.postprocess import postprocess

__all__ = ["build_detector", "build_adapter", "aux_pyramid_levels", "aux_loss_scale"]


def aux_loss_scale(cfg: ModelConfig) -> float:
    """Official Co-DETR weighting: every aux-head loss is multiplied by ``lambda_2 * num_decoder_layers``."""
    return cfg.co_detr.lambda_2 * cfg.num_decoder_layers


def _adapter_plan(cfg: ModelConfig, encoder_strides: list[int]) -> tuple[str, int, int]:
    """``(kind, num_up, num_down)`` of the ``model.co_detr.adapter`` for an encoder with ``encoder_strides``."""
    a = cfg.co_detr.adapter
    kind = a.type if a.type != "auto" else ("single_scale" if len(encoder_strides) == 1 else "multi_scale")
    if kind == "multi_scale":
        return kind, 0, a.num_extra
    stride = int(encoder_strides[-1])
    return kind, _octaves(stride, a.min_stride, "min_stride"), _octaves(a.max_stride, stride, "max_stride")


def aux_pyramid_levels(cfg: ModelConfig, encoder_strides: list[int]) -> int:
    """Levels of the aux heads' pyramid: encoder levels + ``num_extra`` (multi-scale) or
    ``num_up + 1 + num_down`` (single-scale)."""
    kind, num_up, num_down = _adapter_plan(cfg, encoder_strides)
    return len(encoder_strides) + num_down if kind == "multi_scale" else num_up + 1 + num_down


def build_adapter(cfg: ModelConfig, encoder_strides: list[int]) -> nn.Module:
    """The ``model.co_detr.adapter`` (see :class:`~codetr.core.config.schema.AdapterConfig`) for an encoder whose
    levels have ``encoder_strides``."""
    kind, num_up, num_down = _adapter_plan(cfg, encoder_strides)
    groups = cfg.co_detr.adapter.norm_groups
    if kind == "multi_scale":
        return MultiScaleAdapter(cfg.hidden_dim, groups, num_down)
    return SingleScaleAdapter(cfg.hidden_dim, num_down=num_down, num_up=num_up, norm_groups=groups)


def _octaves(big: int, small: int, field: str) -> int:
    """log2(big / small) for a power-of-2 ratio >= 1, else a ValueError naming the adapter field."""
    ratio = big // small if small and big % small == 0 else 0
    if ratio < 1 or ratio & (ratio - 1):
        raise ValueError(f"model.co_detr.adapter.{field}: the single-scale adapter needs strides that are powers of "
                         f"2 apart from the encoder stride, got {big} vs {small}")
    return ratio.bit_length() - 1


def _with_pyramid_levels(head_cfg, levels: int):
    """A head config with a ``pyramid_levels`` field left unset (and no explicit ``strides``) gets the adapter's
    level count, so the pyramid's shape has one source of truth (the adapter)."""
    fields = type(head_cfg).model_fields
    if "pyramid_levels" in fields and head_cfg.pyramid_levels is None and getattr(head_cfg, "strides", None) is None:
        return head_cfg.model_copy(update={"pyramid_levels": levels})
    return head_cfg


def _build_collaborative(cfg: ModelConfig, encoder_strides: list[int]) -> nn.Module | None:
    if not cfg.aux_heads:
        return None
    scale = aux_loss_scale(cfg)
    levels = aux_pyramid_levels(cfg, encoder_strides)
    heads = [registry.build("aux_heads", _with_pyramid_levels(head_cfg, levels), scale)
             for head_cfg in cfg.aux_heads]
    encoder = None
    if cfg.co_detr.with_pos_queries:
        if cfg.query_encoder is None:
            raise ValueError("model.query_encoder: required when model.aux_heads is set and "
                             "co_detr.with_pos_queries is true (e.g. {type: positive_queries})")
        encoder = registry.build("query_encoders", cfg.query_encoder, len(heads))
    adapter = build_adapter(cfg, encoder_strides)  # after the heads: the seeded-build RNG order of before
    branch = CollaborativeBranch(adapter, heads, encoder, lambda_1=cfg.co_detr.lambda_1,
                                 head_types=[h.type for h in cfg.aux_heads])
    if cfg.co_detr.eval_module != "detr":
        branch.head_index(cfg.co_detr.eval_module)  # fail at build time, naming the choices
    return branch


def build_detector(cfg: ModelConfig) -> Detector:
    """Build every component through the registry and assemble the detector.

    Raises ``ValueError`` naming the recipe field when the parts do not fit together (e.g. the neck
    produces a different number of levels than ``model.num_levels``).
    """
    if cfg.num_classes is None:
        raise ValueError("model.num_classes is not resolved; load the recipe with codetr.assembly.load_recipe")
    backbone = registry.build("backbones", cfg.backbone)
    neck = registry.build("necks", cfg.neck, list(backbone.out_channels), list(backbone.strides))
    if len(neck.out_strides) != cfg.num_levels:
        raise ValueError(
            f"model.num_levels is {cfg.num_levels} but the backbone gives {len(backbone.out_channels)} levels and "
            f"the neck adds {len(neck.out_strides) - len(backbone.out_channels)}: change backbone.out_indices, "
            "neck.num_extra_levels or model.num_levels")
    if cfg.co_detr.eval_module != "detr" and not cfg.aux_heads:
        raise ValueError(f"model.co_detr.eval_module={cfg.co_detr.eval_module!r} selects an aux head, but "
                         "model.aux_heads is empty; use eval_module: detr")
    variant = registry.build("variants", cfg.variant)
    criterion = SetCriterion(cfg.criterion)
    post = partial(postprocess, topk=cfg.test.topk, soft_nms=cfg.test.soft_nms)
    return Detector(backbone, neck, variant, criterion, post, num_classes=cfg.num_classes,
                    collaborative=_build_collaborative(cfg, list(neck.out_strides)), eval_module=cfg.co_detr.eval_module,
                    score_threshold=cfg.test.score_threshold, exact_padding=cfg.test.exact_padding)
