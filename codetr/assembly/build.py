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
from codetr.heads.adapter import MultiScaleAdapter
from codetr.heads.collaborative import CollaborativeBranch
from codetr.heads.criterion import SetCriterion
from codetr.variants.postprocess import postprocess

__all__ = ["build_detector", "aux_loss_scale"]


def aux_loss_scale(cfg: ModelConfig) -> float:
    """Official Co-DETR weighting: every aux-head loss is multiplied by ``lambda_2 * num_decoder_layers``."""
    return cfg.co_detr.lambda_2 * cfg.num_decoder_layers


def _build_collaborative(cfg: ModelConfig) -> nn.Module | None:
    if not cfg.aux_heads:
        return None
    scale = aux_loss_scale(cfg)
    heads = [registry.build("aux_heads", head_cfg, scale) for head_cfg in cfg.aux_heads]
    encoder = None
    if cfg.co_detr.with_pos_queries:
        if cfg.query_encoder is None:
            raise ValueError("model.query_encoder: required when model.aux_heads is set and "
                             "co_detr.with_pos_queries is true (e.g. {type: positive_queries})")
        encoder = registry.build("query_encoders", cfg.query_encoder, len(heads))
    adapter = MultiScaleAdapter(cfg.hidden_dim)
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
                    collaborative=_build_collaborative(cfg), eval_module=cfg.co_detr.eval_module,
                    score_threshold=cfg.test.score_threshold, exact_padding=cfg.test.exact_padding)
