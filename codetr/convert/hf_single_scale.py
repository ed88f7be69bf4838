"""HuggingFace ``transformers`` Conditional-DETR / DAB-DETR -> codetr state dict (and the recipes that reproduce them).

:func:`convert_hf_conditional_detr` / :func:`convert_hf_dab_detr` map a ``ConditionalDetrForObjectDetection`` /
``DabDetrForObjectDetection`` state dict (transformers 5.x names) onto codetr's ``backbone.*`` / ``neck.*`` /
``variant.*`` layout; :func:`hf_conditional_recipe_model` / :func:`hf_dab_recipe_model` build the recipe ``model``
section of the codetr detector that computes the same function. As :mod:`codetr.convert.hf` (whose backbone key
map and config helpers are reused), ``transformers`` is never imported: plain tensors and config attributes.

Key map, both models (``{i}`` layer)::

    model.backbone.*                                             backbone.*   (codetr.convert.hf.hf_backbone_key)
    model.input_projection.{weight,bias}                         neck.convs.0.conv.{weight,bias}
    model.encoder.layers.{i}.self_attn.{q,k,v}_proj.*            variant.encoder.layers.{i}.self_attn.in_proj_*
                                                                 (concatenated q, k, v: nn.MultiheadAttention)
    model.encoder.layers.{i}.self_attn.{o_proj,out_proj}         variant.encoder.layers.{i}.self_attn.out_proj
    model.encoder.layers.{i}.{self_attn_layer_norm,final_layer_norm}   ....{norm1,norm2}
    model.decoder.{layernorm,query_scale,ref_point_head}         variant.decoder.{norm,query_scale,ref_point_head}

Conditional-DETR (the names of ``model.state_dict()`` in transformers 5.x; the names HF writes to disk -- the
original repository's ``sa_qcontent_proj`` / ``ca_qpos_sine_proj`` / ``self_attn.out_proj`` / ``fc1`` ... -- map
to the same targets)::

    model.query_position_embeddings.weight                       variant.query_embedding.weight
    model.encoder.layers.{i}.mlp.{fc1,fc2}                       variant.encoder.layers.{i}.ffn.{fc1,fc2}
    model.decoder.layers.{i}.self_attn.{q_content,q_pos,k_content,k_pos,v}_proj   ....self_attn.{q_content,...,v}
    model.decoder.layers.{i}.encoder_attn.{...,q_pos_sine}_proj  variant.decoder.layers.{i}.cross_attn.{...}
    model.decoder.layers.{i}.{self_attn,encoder_attn}.o_proj     ....{self_attn,cross_attn}.out_proj
    model.decoder.layers.{i}.{self_attn,encoder_attn,final}_layer_norm    ....{norm1,norm2,norm3}
    class_labels_classifier.* / bbox_predictor.*                 variant.class_heads.0.* / variant.box_heads.0.*

DAB-DETR::

    model.query_refpoint_embeddings.weight                       variant.anchor_embedding.weight
    model.encoder.query_scale.*                                  variant.encoder.query_scale.*
    model.encoder.layers.{i}.{fc1,fc2,activation_fn}             variant.encoder.layers.{i}.ffn.{fc1,fc2,act}
    model.decoder.layers.{i}.self_attn.self_attn_{query,key}_{content,pos}_proj   ....self_attn.{q,k}_{content,pos}
    model.decoder.layers.{i}.self_attn.self_attn_value_proj      ....self_attn.v
    model.decoder.layers.{i}.self_attn.self_attn.output_proj     ....self_attn.out_proj
    model.decoder.layers.{i}.self_attn.self_attn_layer_norm      ....norm1
    model.decoder.layers.{i}.cross_attn.cross_attn_*_proj        ....cross_attn.{q_content,q_pos,k_content,k_pos,v,
                                                                               q_pos_sine}
    model.decoder.layers.{i}.cross_attn.cross_attn.output_proj   ....cross_attn.out_proj
    model.decoder.layers.{i}.cross_attn.cross_attn_layer_norm    ....norm2
    model.decoder.layers.{i}.mlp.{fc1,fc2,activation_fn,final_layer_norm}   ....{ffn.fc1,ffn.fc2,ffn.act,norm3}
    model.decoder.ref_anchor_head.*                              variant.decoder.ref_anchor_head.*
    class_embed.* / bbox_predictor.*                             variant.class_heads.0.* / variant.box_heads.0.*
    model.decoder.bbox_embed.*  (HF's tied copy of bbox_predictor)   same target; checked equal, an alias

Semantics codetr reproduces with recipe options (set by the recipe builders; the defaults stay the originals'):
``criterion.cls_weight: 1`` (HF hard-codes the focal-loss weight 1 and ignores ``cls_loss_coefficient``),
HF's matcher costs / L1 / GIoU weights / focal alpha, ``prior_prob`` = HF's class-bias init (0.5 = bias 0 for
Conditional-DETR; ``initializer_bias_prior_prob`` or ``1 / (num_labels + 1)`` for DAB-DETR), ``anchor_init:
uniform_xy`` for DAB's ``random_refpoints_xy``, ``norm_feedback`` for Conditional-DETR's ``auxiliary_loss=True``,
``dropout`` = HF's ``dropout`` and ``test.exact_padding: false``
(HF runs the CNN on the padded batch). HF configurations codetr has no equivalent for raise ``ValueError``
(see each builder). Every difference is listed in ``docs/deviations.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from codetr.convert.hf import hf_backbone_key, hf_backbone_recipe, hf_config_get, hf_tensor_dict
from codetr.convert.official import ConversionReport

__all__ = ["convert_hf_conditional_detr", "convert_hf_dab_detr", "hf_conditional_recipe_model",
           "hf_dab_recipe_model", "hf_single_scale_key"]

_COMMON = [
    (r"^model\.input_projection\.(weight|bias)$", r"neck.convs.0.conv.\1"),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.(?:o_proj|out_proj)\.",
     r"variant.encoder.layers.\1.self_attn.out_proj."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"variant.encoder.layers.\1.norm1."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"variant.encoder.layers.\1.norm2."),
    (r"^model\.decoder\.layernorm\.", "variant.decoder.norm."),
    (r"^model\.decoder\.(query_scale|ref_point_head)\.", r"variant.decoder.\1."),
]
_DEC = r"^model\.decoder\.layers\.(\d+)\."
_OUT = r"variant.decoder.layers.\1."
_CONDITIONAL = _COMMON + [
    (r"^model\.query_position_embeddings\.weight$", "variant.query_embedding.weight"),
    (r"^model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"variant.encoder.layers.\1.ffn.\2."),
    (_DEC + r"self_attn\.(q_content|q_pos|k_content|k_pos|v)_proj\.", _OUT + r"self_attn.\2."),
    (_DEC + r"encoder_attn\.(q_content|q_pos|k_content|k_pos|v|q_pos_sine)_proj\.", _OUT + r"cross_attn.\2."),
    (_DEC + r"self_attn\.o_proj\.", _OUT + "self_attn.out_proj."),
    (_DEC + r"encoder_attn\.o_proj\.", _OUT + "cross_attn.out_proj."),
    (_DEC + r"self_attn_layer_norm\.", _OUT + "norm1."),
    (_DEC + r"encoder_attn_layer_norm\.", _OUT + "norm2."),
    (_DEC + r"final_layer_norm\.", _OUT + "norm3."),
    (_DEC + r"mlp\.(fc1|fc2)\.", _OUT + r"ffn.\2."),
    (r"^class_labels_classifier\.", "variant.class_heads.0."),
    (r"^bbox_predictor\.", "variant.box_heads.0."),
    # the names HF writes to disk (``save_pretrained`` / hub checkpoints: the original repository's)
    (r"^model\.encoder\.layers\.(\d+)\.(fc1|fc2)\.", r"variant.encoder.layers.\1.ffn.\2."),
    (_DEC + r"(fc1|fc2)\.", _OUT + r"ffn.\2."),
    (_DEC + r"self_attn\.out_proj\.", _OUT + "self_attn.out_proj."),
    (_DEC + r"encoder_attn\.out_proj\.", _OUT + "cross_attn.out_proj."),
] + [(_DEC + rf"{pre}_{legacy}_proj\.", _OUT + rf"{part}.{ours}.")
     for pre, part in (("sa", "self_attn"), ("ca", "cross_attn"))
     for legacy, ours in (("qcontent", "q_content"), ("qpos", "q_pos"), ("kcontent", "k_content"), ("kpos", "k_pos"),
                          ("v", "v"), ("qpos_sine", "q_pos_sine"))
     if pre == "ca" or legacy != "qpos_sine"]
_DAB = _COMMON + [
    (r"^model\.query_refpoint_embeddings\.weight$", "variant.anchor_embedding.weight"),
    (r"^model\.encoder\.query_scale\.", "variant.encoder.query_scale."),
    (r"^model\.encoder\.layers\.(\d+)\.(fc1|fc2)\.", r"variant.encoder.layers.\1.ffn.\2."),
    (r"^model\.encoder\.layers\.(\d+)\.activation_fn\.", r"variant.encoder.layers.\1.ffn.act."),
    (_DEC + r"self_attn\.self_attn_query_(content|pos)_proj\.", _OUT + r"self_attn.q_\2."),
    (_DEC + r"self_attn\.self_attn_key_(content|pos)_proj\.", _OUT + r"self_attn.k_\2."),
    (_DEC + r"self_attn\.self_attn_value_proj\.", _OUT + "self_attn.v."),
    (_DEC + r"self_attn\.self_attn\.output_proj\.", _OUT + "self_attn.out_proj."),
    (_DEC + r"self_attn\.self_attn_layer_norm\.", _OUT + "norm1."),
    (_DEC + r"cross_attn\.cross_attn_query_(content|pos)_proj\.", _OUT + r"cross_attn.q_\2."),
    (_DEC + r"cross_attn\.cross_attn_key_(content|pos)_proj\.", _OUT + r"cross_attn.k_\2."),
    (_DEC + r"cross_attn\.cross_attn_value_proj\.", _OUT + "cross_attn.v."),
    (_DEC + r"cross_attn\.cross_attn_query_pos_sine_proj\.", _OUT + "cross_attn.q_pos_sine."),
    (_DEC + r"cross_attn\.cross_attn\.output_proj\.", _OUT + "cross_attn.out_proj."),
    (_DEC + r"cross_attn\.cross_attn_layer_norm\.", _OUT + "norm2."),
    (_DEC + r"mlp\.(fc1|fc2)\.", _OUT + r"ffn.\2."),
    (_DEC + r"mlp\.activation_fn\.", _OUT + "ffn.act."),
    (_DEC + r"mlp\.final_layer_norm\.", _OUT + "norm3."),
    (r"^model\.decoder\.ref_anchor_head\.", "variant.decoder.ref_anchor_head."),
    (r"^class_embed\.", "variant.class_heads.0."),
    (r"^(?:bbox_predictor|model\.decoder\.bbox_embed)\.", "variant.box_heads.0."),
]
_RULES = {"conditional_detr": [(re.compile(a), b) for a, b in _CONDITIONAL],
          "dab_detr": [(re.compile(a), b) for a, b in _DAB]}
_ENC_QKV = re.compile(r"^model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
#: HF keys that are tied copies of another key (same target, must hold the same tensor)
_TIED = re.compile(r"^model\.decoder\.bbox_embed\.")


def hf_single_scale_key(key: str, variant: str) -> str | None:
    """One HF key -> codetr key for ``variant`` (``"conditional_detr"`` / ``"dab_detr"``), or None.

    The encoder self-attention ``q/k/v_proj`` (merged into ``in_proj_*``) is handled by the converters."""
    if variant not in _RULES:
        raise ValueError(f"unknown single-scale variant {variant!r}; expected one of {sorted(_RULES)}")
    if (dst := hf_backbone_key(key)) is not None:
        return dst
    for pattern, repl in _RULES[variant]:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def _convert(hf_state_dict: Mapping[str, Tensor], variant: str, target_keys: Iterable[str] | None
             ) -> tuple[dict[str, Tensor], ConversionReport]:
    sd = hf_tensor_dict(hf_state_dict)
    report = ConversionReport()
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            report.ignored.append(key)
            continue
        if (m := _ENC_QKV.match(key)):
            layer, part, param = m.groups()
            qkv.setdefault((layer, param), {})[part] = value
            report.matched.append((key, f"variant.encoder.layers.{layer}.self_attn.in_proj_{param}"))
            continue
        dst = hf_single_scale_key(key, variant)
        if dst is None:
            report.unmatched[key] = value
            continue
        if dst in out:
            tied = key if _TIED.match(key) else next((s for s, d in report.matched if d == dst), "")
            if not _TIED.match(tied):
                raise ValueError(f"two HF keys map to {dst!r}: {tied or '?'} and {key}")
            if not torch.equal(out[dst], value):
                raise ValueError(f"{tied} should be HF's tied copy of the box head (bbox_predictor) but differs "
                                 "from it; codetr's DAB-DETR uses one box head for the predictions and the anchor update")
            if tied == key:
                report.aliases[key] = dst
                continue
            report.aliases[tied] = dst
            report.matched = [(s, d) for s, d in report.matched if s != tied]
        out[dst] = value
        report.matched.append((key, dst))
    for (layer, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"encoder layer {layer} self-attention: expected q/k/v_proj.{param}, got {sorted(parts)}")
        out[f"variant.encoder.layers.{layer}.self_attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], 0)
    if target_keys is not None:
        report.missing = sorted(k for k in set(target_keys) - set(out) if not k.endswith("num_batches_tracked"))
    return out, report


def convert_hf_conditional_detr(hf_state_dict: Mapping[str, Tensor], *, target_keys: Iterable[str] | None = None
                                ) -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert an HF ``ConditionalDetrForObjectDetection`` state dict to codetr's detector layout.

    Args:
        hf_state_dict: ``model.state_dict()`` (a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is
            unwrapped, a ``module.`` prefix stripped).
        target_keys: codetr model keys (``model.state_dict().keys()``): enables the ``missing`` report.

    Returns:
        ``(state_dict, report)`` (:class:`~codetr.convert.official.ConversionReport`: ``matched``, ``aliases``,
        ``unmatched`` HF keys with their tensors, ``missing`` target keys, ``ignored`` BN counters).
    """
    return _convert(hf_state_dict, "conditional_detr", target_keys)


def convert_hf_dab_detr(hf_state_dict: Mapping[str, Tensor], *, target_keys: Iterable[str] | None = None
                        ) -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert an HF ``DabDetrForObjectDetection`` state dict to codetr's detector layout (arguments and result
    as :func:`convert_hf_conditional_detr`). HF's ``model.decoder.bbox_embed.*`` (the anchor-update head, tied
    to ``bbox_predictor``) must equal the prediction head; it is reported as an alias."""
    return _convert(hf_state_dict, "dab_detr", target_keys)


# --------------------------------------------------------------------------- recipes
def _common_checks(config: Any, name: str) -> None:
    get = lambda key, default=None: hf_config_get(config, key, default)  # noqa: E731
    if get("encoder_ffn_dim") != get("decoder_ffn_dim"):
        raise ValueError(f"codetr {name} uses one FFN width for encoder and decoder; HF has "
                         f"encoder_ffn_dim={get('encoder_ffn_dim')} decoder_ffn_dim={get('decoder_ffn_dim')}")
    if get("encoder_attention_heads") != get("decoder_attention_heads"):
        raise ValueError(f"codetr {name} uses one head count for encoder and decoder")
    if get("position_embedding_type", "sine") != "sine":
        raise ValueError("only position_embedding_type='sine' has a codetr equivalent")


def _single_level_backbone(config: Any, frozen_stages: int) -> dict[str, Any]:
    backbone = hf_backbone_recipe(config, frozen_stages)
    if backbone["out_indices"][-1] != 4:
        raise ValueError(f"HF uses its last backbone feature map; codetr's single-scale variants use C5 (stage4), "
                         f"this config's last output is stage{backbone['out_indices'][-1]}")
    backbone["out_indices"] = [4]
    return backbone


def _model(config: Any, variant: dict[str, Any], backbone: dict[str, Any], hidden: int, topk: int) -> dict[str, Any]:
    get = lambda key, default=None: hf_config_get(config, key, default)  # noqa: E731
    return {
        "num_classes": int(get("num_labels", 2)),
        "hidden_dim": hidden,
        "num_levels": 1,
        "num_queries": int(get("num_queries", 300)),
        "num_decoder_layers": int(get("decoder_layers", 6)),
        "backbone": backbone,
        "neck": {"type": "channel_mapper", "norm": "none", "num_extra_levels": 0},
        "variant": variant,
        # HF's loss: focal weight hard-coded to 1, its own costs / box weights / alpha
        "criterion": {"cls_loss": "focal", "cls_weight": 1.0, "bbox_weight": float(get("bbox_loss_coefficient", 5)),
                      "giou_weight": float(get("giou_loss_coefficient", 2)),
                      "focal_alpha": float(get("focal_alpha", 0.25)),
                      "enc_loss": "none",
                      "matcher": {"type": "hungarian", "cost_class": float(get("class_cost", 2)),
                                  "cost_bbox": float(get("bbox_cost", 5)), "cost_giou": float(get("giou_cost", 2)),
                                  "focal_alpha": 0.25, "focal_eps": 1e-8}},
        # HF runs the CNN on the padded batch; codetr's default (exact_padding) runs it per image at inference
        "test": {"topk": topk, "exact_padding": False},
    }


def hf_conditional_recipe_model(config: Any, *, frozen_stages: int = 1, topk: int = 100) -> dict[str, Any]:
    """Recipe ``model`` section of the codetr detector equivalent to an HF ``ConditionalDetrConfig``.

    Load it with ``load_recipe_dict({"name": ..., "model": ..., "schedule": {...}})`` and
    :func:`codetr.assembly.build_detector`, then load :func:`convert_hf_conditional_detr`'s output strictly.

    ``auxiliary_loss=True`` sets ``variant.norm_feedback: true``: with it HF applies the decoder LayerNorm *in
    place* at every layer (the next layer and ``query_scale`` see the normed output, the last output is normed
    twice), a different function from the original Conditional-DETR, whose norm only feeds the heads.

    Raises ``ValueError`` for HF options codetr has no equivalent of: different encoder / decoder FFN widths or
    head counts, activations other than ReLU / PReLU, learned position embeddings, non-ResNet or non-C5
    backbones.
    """
    get = lambda key, default=None: hf_config_get(config, key, default)  # noqa: E731
    _common_checks(config, "Conditional-DETR")
    act = get("activation_function", "relu")
    if act not in ("relu", "prelu"):
        raise ValueError(f"activation_function={act!r} has no codetr equivalent (relu, prelu)")
    variant = {
        "type": "conditional_detr",
        "num_encoder_layers": int(get("encoder_layers", 6)),
        "num_heads": int(get("encoder_attention_heads", 8)),
        "ffn_dim": int(get("encoder_ffn_dim", 2048)),
        "dropout": float(get("dropout", 0.1)),
        "activation": act,
        "pe_temperature": 10000.0,
        "prior_prob": 0.5,  # HF's init leaves the class bias at 0 (= prior 0.5); the original uses 0.01
        "norm_feedback": bool(get("auxiliary_loss", False)),
    }
    return _model(config, variant, _single_level_backbone(config, frozen_stages), int(get("d_model", 256)), topk)


def hf_dab_recipe_model(config: Any, *, frozen_stages: int = 1, topk: int = 300) -> dict[str, Any]:
    """Recipe ``model`` section of the codetr detector equivalent to an HF ``DabDetrConfig`` (use as
    :func:`hf_conditional_recipe_model`, with :func:`convert_hf_dab_detr`).

    Raises ``ValueError`` for HF options codetr has no equivalent of: different encoder / decoder FFN widths or
    head counts, activations other than PReLU / ReLU, ``num_patterns`` > 0 (Anchor-DETR patterns),
    ``normalize_before`` (pre-norm), ``query_dim`` != 4, different H / W PE temperatures, a sine PE scale other
    than 2pi, non-ResNet or non-C5 backbones.
    """
    get = lambda key, default=None: hf_config_get(config, key, default)  # noqa: E731
    _common_checks(config, "DAB-DETR")
    act = get("activation_function", "prelu")
    if act not in ("relu", "prelu"):
        raise ValueError(f"activation_function={act!r} has no codetr equivalent (relu, prelu)")
    if int(get("num_patterns", 0) or 0) > 0:
        raise ValueError("num_patterns > 0 (Anchor-DETR pattern embeddings) is not implemented in codetr's DAB-DETR")
    if get("normalize_before", False):
        raise ValueError("normalize_before=True (pre-norm layers) has no codetr equivalent; codetr is post-norm")
    if int(get("query_dim", 4)) != 4:
        raise ValueError("DAB-DETR needs query_dim=4 (4-D anchors)")
    t_h, t_w = float(get("temperature_height", 20)), float(get("temperature_width", 20))
    if t_h != t_w:
        raise ValueError(f"codetr uses one image PE temperature; HF has temperature_height={t_h} "
                         f"temperature_width={t_w}")
    scale = get("sine_position_embedding_scale", None)
    if scale is not None and abs(float(scale) - 2 * math.pi) > 1e-9:
        raise ValueError(f"sine_position_embedding_scale={scale} has no codetr equivalent (2pi)")
    num_labels = int(get("num_labels", 2))
    prior = get("initializer_bias_prior_prob", None) or 1.0 / (num_labels + 1)
    variant = {
        "type": "dab_detr",
        "num_encoder_layers": int(get("encoder_layers", 6)),
        "num_heads": int(get("encoder_attention_heads", 8)),
        "ffn_dim": int(get("encoder_ffn_dim", 2048)),
        "dropout": float(get("dropout", 0.1)),
        "activation": act,
        "pe_temperature": t_h,
        "keep_query_pos": bool(get("keep_query_pos", False)),
        "modulate_hw_attn": True,
        "anchor_init": "uniform_xy" if get("random_refpoints_xy", False) else "normal",
        "prior_prob": float(prior),
    }
    return _model(config, variant, _single_level_backbone(config, frozen_stages), int(get("hidden_size", 256)), topk)
