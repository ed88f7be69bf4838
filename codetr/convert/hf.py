"""HuggingFace ``transformers`` Deformable-DETR -> codetr state dict (and the recipe that reproduces it).

:func:`convert_hf_deformable_detr` maps a ``DeformableDetrForObjectDetection`` state dict (transformers 5.x
names, 4.x names accepted where they differ) onto codetr's ``backbone.*`` / ``neck.*`` / ``variant.*`` layout;
:func:`hf_recipe_model` builds the recipe ``model`` section of the codetr detector that computes the same
function. ``transformers`` itself is never imported here: the converter works on plain tensors and the recipe
helper on the config's attributes (an HF config object or its ``to_dict()``).

Key map (``{s}`` stage, ``{b}`` block, ``{j}`` conv in block, ``{i}`` layer, ``{k}`` head)::

    model.backbone.model.embedder.embedder.{convolution,normalization}.*     backbone.{conv1,bn1}.*
    model.backbone.model.encoder.stages.{s}.layers.{b}.layer.{j}.convolution backbone.layer{s+1}.{b}.conv{j+1}
    ...layer.{j}.normalization.*                                              backbone.layer{s+1}.{b}.bn{j+1}.*
    ...layers.{b}.shortcut.{convolution,normalization}.*                      backbone.layer{s+1}.{b}.downsample.{0,1}.*
    model.backbone.model.{conv1,bn1,layer*}.*  (timm backbone)                backbone.* (same names)
    model.input_proj.{i}.0.{weight,bias}  (1x1, backbone level i)             neck.convs.{i}.conv.*
    model.input_proj.{i}.0.*              (3x3 s2, extra level j)             neck.extra_convs.{j}.conv.*
    model.input_proj.{i}.1.*              (GroupNorm)                         neck.convs.{i}.gn.* / extra_convs.{j}.gn.*
    model.level_embed                                                         variant.level_embed
    model.encoder.layers.{i}.self_attn.*                                      variant.encoder.layers.{i}.self_attn.*
    model.encoder.layers.{i}.{self_attn_layer_norm,final_layer_norm}          variant.encoder.layers.{i}.{norm1,norm2}
    model.{en,de}coder.layers.{i}.mlp.{fc1,fc2}  (4.x: .fc1/.fc2)             variant.{en,de}coder.layers.{i}.ffn.{fc1,fc2}
    model.decoder.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}             variant.decoder.layers.{i}.self_attn.in_proj_{weight,bias}
                                                                              (concatenated q, k, v: nn.MultiheadAttention)
    model.decoder.layers.{i}.self_attn.o_proj  (4.x: out_proj)                variant.decoder.layers.{i}.self_attn.out_proj
    model.decoder.layers.{i}.encoder_attn.*                                   variant.decoder.layers.{i}.cross_attn.*
    model.decoder.layers.{i}.{self_attn,encoder_attn,final}_layer_norm        variant.decoder.layers.{i}.{norm1,norm2,norm3}
    class_embed.{k}.*  / bbox_embed.{k}.layers.{0,1,2}.*                      variant.class_heads.{k}.* / box_heads.{k}.layers.*
    model.decoder.{class,bbox}_embed.{k}.*  (tied copies of the above)        same target; checked equal, reported as aliases
    model.query_position_embeddings.weight  (Q, 2C) = [pos | content]         variant.query_embedding.weight (same split)
    model.{reference_points,enc_output,enc_output_norm,pos_trans,pos_trans_norm}.*   variant.<same>.*

Architecture differences the weights cannot bridge, and how they are handled:

* **Input projection bias.** HF (like the original Deformable-DETR repository) has ``Conv2d(bias=True)`` before
  each ``GroupNorm``; codetr's ChannelMapper follows mmcv (no bias before a norm). A per-channel bias in front of
  GN is not removed by it and cannot be folded into other weights, so ``input_proj_bias="keep"`` emits
  ``neck.*.conv.bias`` for a neck built with ``conv_bias: true`` (what :func:`hf_recipe_model` sets), and
  ``"drop"`` removes them -- exact only when they are all zero (true for a randomly initialised HF model, whose
  init zeroes them; a trained checkpoint has non-zero ones and ``"drop"`` raises). ``"auto"`` keeps them when
  ``target_keys`` contains the bias keys (else when any bias is non-zero).
* **Backbone.** HF's own ``ResNetBackbone`` (built without timm) is torchvision's ResNet v1.5 with different
  module names as long as ``downsample_in_bottleneck`` and ``downsample_in_first_stage`` are False (the
  defaults); stride-in-1x1 variants have no codetr equivalent and :func:`hf_recipe_model` rejects them. HF's
  frozen BN computes ``x * (w * rsqrt(var + 1e-5)) + (b - mean * scale)`` and codetr's the same affine map
  through ``F.batch_norm`` (float32 rounding differences only). Both replace every BN with a frozen one.
* **Heads.** HF ties ``class_embed.{k}`` / ``bbox_embed.{k}`` to ``model.decoder.{class,bbox}_embed.{k}`` and,
  depending on the configuration, some heads to head 0 (5.x: the class heads of a ``with_box_refine`` model
  without ``two_stage`` are all one module). A state dict saved without the tied copies is completed from
  head 0 when ``target_keys`` asks for the missing per-layer heads (reported in ``aliases``); identical copies
  are folded onto one head for a codetr model that shares its heads (``shared_heads``, as in
  :func:`codetr.convert.official.convert_sense_x_co_deformable`).

Semantics codetr reproduces with options rather than weights (set by :func:`hf_recipe_model`):
``two_stage_mask_invalid: false`` (HF ranks the two-stage top-k by the raw class-0 logit, padding and
out-of-range proposals included, exactly as the original code), ``mixed_selection`` / ``look_forward_twice``
off (HF has neither), ``two_stage_num_proposals`` = HF's value (the decoder then has that many queries), and
``test.exact_padding: false`` (HF runs backbone + input projections on the zero-padded batch, so padded pixels
reach the valid area through the convolutions; codetr's default runs the CNN per image at inference).
Everything else (sine PE with offset -0.5 / eps 1e-6 / temperature 10000, valid ratios, encoder reference
points, proposal generation, 4-D reference refinement, MSDA sampling) is the codetr default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from codetr.convert.official import ConversionReport, _fold_shared_heads, _unwrap

__all__ = ["convert_hf_deformable_detr", "hf_key", "hf_recipe_model", "hf_backbone_key", "hf_backbone_recipe",
           "hf_config_get", "hf_tensor_dict"]

_BACKBONE_PREFIXES = ("model.backbone.conv_encoder.model.", "model.backbone.model.")
_STEM = {"embedder.embedder.convolution.": "conv1.", "embedder.embedder.normalization.": "bn1."}
_BLOCK = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)$")
_TIMM = re.compile(r"^(conv1|bn1|layer[1-4])\.")


def _backbone_key(k: str) -> str | None:
    for src, dst in _STEM.items():
        if k.startswith(src):
            return dst + k[len(src):]
    if (m := _BLOCK.match(k)):
        stage, block, tail = m.groups()
        pre = f"layer{int(stage) + 1}.{block}."
        if (mm := re.match(r"^layer\.(\d+)\.(convolution|normalization)\.(.*)$", tail)):
            j, kind, param = mm.groups()
            return pre + ("conv" if kind == "convolution" else "bn") + f"{int(j) + 1}.{param}"
        if (mm := re.match(r"^shortcut\.(convolution|normalization)\.(.*)$", tail)):
            kind, param = mm.groups()
            return pre + ("downsample.0." if kind == "convolution" else "downsample.1.") + param
        return None
    if _TIMM.match(k):  # timm / torchvision names are codetr's
        return k
    return None


_ENC_TAIL = {"self_attn_layer_norm.": "norm1.", "final_layer_norm.": "norm2.", "mlp.fc1.": "ffn.fc1.",
             "mlp.fc2.": "ffn.fc2.", "fc1.": "ffn.fc1.", "fc2.": "ffn.fc2.", "self_attn.": "self_attn."}
_DEC_TAIL = {"self_attn_layer_norm.": "norm1.", "encoder_attn_layer_norm.": "norm2.", "final_layer_norm.": "norm3.",
             "mlp.fc1.": "ffn.fc1.", "mlp.fc2.": "ffn.fc2.", "fc1.": "ffn.fc1.", "fc2.": "ffn.fc2.",
             "encoder_attn.": "cross_attn.", "self_attn.o_proj.": "self_attn.out_proj.",
             "self_attn.out_proj.": "self_attn.out_proj."}
_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_SIMPLE = ("reference_points.", "enc_output.", "enc_output_norm.", "pos_trans.", "pos_trans_norm.")


def hf_backbone_key(key: str) -> str | None:
    """An HF DETR-family backbone key (``model.backbone.model.*`` / ``model.backbone.conv_encoder.model.*``, HF
    ResNet or timm names) -> codetr ``backbone.*``; None for any other key (or an unknown backbone tensor).
    Shared by every HF converter (:mod:`codetr.convert.hf_single_scale` too)."""
    for prefix in _BACKBONE_PREFIXES:
        if key.startswith(prefix):
            sub = _backbone_key(key[len(prefix):])
            return None if sub is None else "backbone." + sub
    return None


def hf_key(key: str) -> str | None:
    """One HF key -> codetr key (``backbone.*`` / ``neck.*`` / ``variant.*``), or None if it has no 1:1 target.

    Not handled here (see :func:`convert_hf_deformable_detr`): the decoder self-attention ``q/k/v_proj`` (merged
    into ``in_proj_*``) and the input projections (``neck.convs`` vs ``neck.extra_convs`` depends on the
    kernel size).
    """
    if key.startswith(_BACKBONE_PREFIXES):
        return hf_backbone_key(key)
    if (m := re.match(r"^(?:model\.decoder\.)?(class|bbox)_embed\.(\d+)\.(.*)$", key)):
        kind, k, tail = m.groups()
        return f"variant.{'class_heads' if kind == 'class' else 'box_heads'}.{k}.{tail}"
    if not key.startswith("model."):
        return None
    k = key[len("model."):]
    if k == "level_embed":
        return "variant.level_embed"
    if k == "query_position_embeddings.weight":
        return "variant.query_embedding.weight"
    if k.startswith(_SIMPLE):
        return "variant." + k
    if (m := re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$", k)):
        part, i, tail = m.groups()
        table = _ENC_TAIL if part == "encoder" else _DEC_TAIL
        for src in sorted(table, key=len, reverse=True):
            if tail.startswith(src):
                return f"variant.{part}.layers.{i}.{table[src]}{tail[len(src):]}"
    return None


def hf_tensor_dict(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """An HF state dict with a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and ``module.`` prefixes removed."""
    sd = _unwrap(sd)
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


_tensor_dict = hf_tensor_dict


def convert_hf_deformable_detr(hf_state_dict: Mapping[str, Tensor], *,
                               input_proj_bias: Literal["auto", "keep", "drop"] = "auto",
                               shared_heads: bool | None = None, target_keys: Iterable[str] | None = None
                               ) -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert an HF ``DeformableDetrForObjectDetection`` state dict to codetr's detector layout.

    Args:
        hf_state_dict: ``model.state_dict()`` (tied copies included or not; a ``{"state_dict": ...}`` /
            ``{"model": ...}`` wrapper is unwrapped, a ``module.`` prefix stripped).
        input_proj_bias: what to do with the ``input_proj`` conv biases (see the module docstring).
        shared_heads: fold identical per-layer heads onto head 0 (codetr's shared-head layout, used without
            ``with_box_refine``): True / False, or None to fold when every copy is identical.
        target_keys: codetr model keys (``model.state_dict().keys()``): enables the missing-key report, the
            ``"auto"`` bias decision and completing tied heads an HF file stored once.

    Returns:
        ``(state_dict, report)`` -- :class:`~codetr.convert.official.ConversionReport`: ``matched`` pairs,
        ``aliases`` (tied HF copies and folded shared heads -> the key they duplicate), ``unmatched`` (HF keys
        with no codetr counterpart, with their tensors), ``missing`` target keys, ``ignored`` (BN
        ``num_batches_tracked``, input-projection biases dropped with ``input_proj_bias="drop"``).
    """
    sd = _tensor_dict(hf_state_dict)
    targets = None if target_keys is None else list(target_keys)
    target_set = set(targets or ())
    report = ConversionReport()
    out: dict[str, Tensor] = {}

    # ---- input projections: backbone levels are the 1x1 convs, extra levels the 3x3 stride-2 ones
    proj = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^model\.input_proj\.(\d+)\.", k))})
    proj_target: dict[int, str] = {}
    n_backbone = 0
    for i in proj:
        w = sd.get(f"model.input_proj.{i}.0.weight")
        if w is not None and w.dim() == 4 and w.shape[-1] == 1:
            proj_target[i] = f"neck.convs.{n_backbone}."
            n_backbone += 1
        else:
            proj_target[i] = f"neck.extra_convs.{i - n_backbone}."
    biases = {i: sd[f"model.input_proj.{i}.0.bias"] for i in proj if f"model.input_proj.{i}.0.bias" in sd}
    if input_proj_bias == "auto":
        if targets is not None:
            keep_bias = any(proj_target[i] + "conv.bias" in target_set for i in biases)
        else:
            keep_bias = any(bool(b.detach().ne(0).any()) for b in biases.values())
    elif input_proj_bias in ("keep", "drop"):
        keep_bias = input_proj_bias == "keep"
    else:
        raise ValueError(f"input_proj_bias must be 'auto', 'keep' or 'drop', got {input_proj_bias!r}")
    if not keep_bias:
        nonzero = [f"model.input_proj.{i}.0.bias" for i, b in biases.items() if bool(b.detach().ne(0).any())]
        if nonzero:
            raise ValueError(
                f"{len(nonzero)} HF input-projection conv biases are non-zero (e.g. {nonzero[0]}); they sit in front "
                "of a GroupNorm and cannot be folded away. Build the neck with `conv_bias: true` (see "
                "codetr.convert.hf.hf_recipe_model) and convert with input_proj_bias='keep' (or pass target_keys).")

    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            report.ignored.append(key)
            continue
        if (m := re.match(r"^model\.input_proj\.(\d+)\.([01])\.(weight|bias)$", key)):
            i, sub, param = int(m.group(1)), m.group(2), m.group(3)
            if sub == "0" and param == "bias" and not keep_bias:
                report.ignored.append(key)
                continue
            dst = proj_target[i] + ("conv." if sub == "0" else "gn.") + param
        elif (m := re.match(r"^model\.decoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj\.(?:weight|bias))$", key)):
            mm = _QKV.match(m.group(2))
            assert mm is not None
            qkv.setdefault((m.group(1), mm.group(2)), {})[mm.group(1)] = value
            report.matched.append((key, f"variant.decoder.layers.{m.group(1)}.self_attn.in_proj_{mm.group(2)}"))
            continue
        else:
            dst = hf_key(key)
        if dst is None:
            report.unmatched[key] = value
            continue
        if dst in out:
            if key.startswith("model.decoder.") and ("class_embed" in key or "bbox_embed" in key):
                if not torch.equal(out[dst], value):
                    raise ValueError(f"{key} should be HF's tied copy of the top-level head but differs from it")
                report.aliases[key] = dst
                continue
            prev = next((s for s, d in report.matched if d == dst), "?")
            if (prev.startswith("model.decoder.") and torch.equal(out[dst], value)):
                report.aliases[prev] = dst
                report.matched = [(s, d) for s, d in report.matched if s != prev]
            else:
                raise ValueError(f"two HF keys map to {dst!r}: {prev} and {key}")
        out[dst] = value
        report.matched.append((key, dst))

    for (i, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"decoder layer {i} self-attention: expected q/k/v_proj.{param}, got {sorted(parts)}")
        out[f"variant.decoder.layers.{i}.self_attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], 0)

    if targets is not None:  # heads HF stored once (tied to head 0) but codetr keeps per layer
        for t in targets:
            m = re.match(r"^variant\.(class_heads|box_heads)\.(\d+)\.(.*)$", t)
            if m and t not in out and m.group(2) != "0":
                src = f"variant.{m.group(1)}.0.{m.group(3)}"
                if src in out:
                    out[t] = out[src].clone()
                    report.aliases[t] = src
    if shared_heads is None and targets is not None:
        shared_heads = not any(t.startswith("variant.class_heads.1.") for t in targets)
    if shared_heads is not False:
        _fold_shared_heads(out, report, shared_heads)
    if targets is not None:
        report.missing = sorted(k for k in set(targets) - set(out) if not k.endswith("num_batches_tracked"))
    return out, report


# --------------------------------------------------------------------------- recipe
_RESNET_DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34,
                  ("bottleneck", (3, 4, 6, 3)): 50, ("bottleneck", (3, 4, 23, 3)): 101}
_RESNET_WIDTHS = {"basic": (64, 128, 256, 512), "bottleneck": (256, 512, 1024, 2048)}


def hf_config_get(cfg: Any, name: str, default: Any = None) -> Any:
    """Attribute ``name`` of an HF config object or of its ``to_dict()``."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


_get = hf_config_get


def hf_backbone_recipe(config: Any, frozen_stages: int) -> dict[str, Any]:
    """Recipe ``model.backbone`` (``type: resnet``) equivalent to an HF DETR-family config's backbone (HF's own
    ResNet from ``backbone_config``, or a timm ResNet); ``ValueError`` for backbones codetr cannot build."""
    levels = int(_get(config, "num_feature_levels", 4))
    if _get(config, "use_timm_backbone", False):
        name = str(_get(config, "backbone", "") or "")
        m = re.fullmatch(r"resnet(18|34|50|101)", name)
        if m is None or _get(config, "dilation", False):
            raise ValueError(f"timm backbone {name!r} (dilation={_get(config, 'dilation', False)}) has no codetr "
                             "equivalent; supported: resnet18/34/50/101 without dilation")
        depth = int(m.group(1))
        kw = _get(config, "backbone_kwargs", None) or {}
        out_indices = tuple(kw.get("out_indices", (2, 3, 4) if levels > 1 else (4,)))
    else:
        bb = _get(config, "backbone_config", None)
        if bb is None or _get(bb, "model_type", "resnet") != "resnet":
            raise ValueError("only HF ResNet backbones (backbone_config=ResNetConfig(...)) are supported")
        layer_type = _get(bb, "layer_type", "bottleneck")
        depths = tuple(_get(bb, "depths", (3, 4, 6, 3)))
        depth = _RESNET_DEPTHS.get((layer_type, depths))
        widths = tuple(_get(bb, "hidden_sizes", ()))
        if depth is None or widths != _RESNET_WIDTHS[layer_type] or _get(bb, "embedding_size", 64) != 64:
            raise ValueError(f"HF ResNet {layer_type} depths={depths} hidden_sizes={widths} is not a "
                             "ResNet-18/34/50/101 codetr can build")
        if _get(bb, "downsample_in_bottleneck", False) or _get(bb, "downsample_in_first_stage", False) \
                or _get(bb, "hidden_act", "relu") != "relu":
            raise ValueError("HF ResNet with downsample_in_bottleneck / downsample_in_first_stage / a non-ReLU "
                             "activation differs from torchvision's ResNet v1.5 (codetr's backbone)")
        names = list(_get(bb, "out_features", None) or ["stage4"])
        out_indices = tuple(int(n.replace("stage", "")) for n in names)
    return {"type": "resnet", "depth": depth, "out_indices": list(out_indices), "frozen_stages": frozen_stages,
            "norm": "frozen_bn"}


def hf_recipe_model(config: Any, *, frozen_stages: int = 1, topk: int = 100) -> dict[str, Any]:
    """Recipe ``model`` section of the codetr detector equivalent to an HF ``DeformableDetrConfig``.

    Load it with ``load_recipe_dict({"name": ..., "model": hf_recipe_model(cfg), "schedule": {...}})`` and
    :func:`codetr.assembly.build_detector`, then load :func:`convert_hf_deformable_detr`'s output with
    ``strict`` key checking. ``frozen_stages`` only affects training (HF 5.x with its own ResNet freezes the
    whole backbone, see detr_variants.md §3.3; 1 = stem + layer1, the official Deformable-DETR setting).

    Raises ``ValueError`` for HF options codetr has no equivalent of (different encoder / decoder FFN widths,
    head counts or point counts, non-ReLU activations, learned position embeddings, non-ResNet backbones).
    """
    get = lambda name, default=None: _get(config, name, default)  # noqa: E731
    if get("encoder_ffn_dim") != get("decoder_ffn_dim"):
        raise ValueError("codetr uses one FFN width for encoder and decoder; HF has "
                         f"encoder_ffn_dim={get('encoder_ffn_dim')} decoder_ffn_dim={get('decoder_ffn_dim')}")
    if get("encoder_attention_heads") != get("decoder_attention_heads") or \
            get("encoder_n_points") != get("decoder_n_points"):
        raise ValueError("codetr uses one head count and one point count for encoder and decoder")
    if get("activation_function", "relu") != "relu" or get("position_embedding_type", "sine") != "sine":
        raise ValueError("only activation_function='relu' and position_embedding_type='sine' have codetr equivalents")
    if get("two_stage", False) and not get("with_box_refine", False):
        raise ValueError("HF two_stage requires with_box_refine")
    backbone = hf_backbone_recipe(config, frozen_stages)
    levels = int(get("num_feature_levels", 4))
    two_stage = bool(get("two_stage", False))
    queries = int(get("two_stage_num_proposals", 300)) if two_stage else int(get("num_queries", 300))
    variant: dict[str, Any] = {
        "type": "deformable_detr",
        "num_encoder_layers": int(get("encoder_layers", 6)),
        "num_heads": int(get("encoder_attention_heads", 8)),
        "num_points": int(get("encoder_n_points", 4)),
        "ffn_dim": int(get("encoder_ffn_dim", 1024)),
        "dropout": float(get("dropout", 0.1)),
        "with_box_refine": bool(get("with_box_refine", False)),
        "two_stage": two_stage,
        "mixed_selection": False,
        "look_forward_twice": False,
        "pe_temperature": 10000.0,
        "pe_offset": -0.5,
    }
    if two_stage:
        variant.update(two_stage_num_proposals=queries, two_stage_mask_invalid=False)
    return {
        "num_classes": int(get("num_labels", 2)),
        "hidden_dim": int(get("d_model", 256)),
        "num_levels": levels,
        "num_queries": queries,
        "num_decoder_layers": int(get("decoder_layers", 6)),
        "backbone": backbone,
        "neck": {"type": "channel_mapper", "num_extra_levels": levels - len(backbone["out_indices"]),
                 "conv_bias": True},
        "variant": variant,
        # HF runs the CNN on the padded batch; codetr's default (exact_padding) runs it per image at inference
        "test": {"topk": topk, "exact_padding": False},
    }
