"""Official checkpoint -> codetr state dict.

codetr's detector layout is ``backbone.*`` (mmdet/torchvision ResNet names), ``neck.*`` and ``variant.*``
(the :class:`~codetr.variants.deformable.DeformableDETR` names listed in its module docstring). Two official
layouts are supported:

* :func:`convert_sense_x_co_deformable` -- Sense-X Co-DETR (mmdet 2.25) ``CoDETR`` with ``CoDeformDETRHead``
  (``query_head.transformer.*``, ``query_head.{cls,reg}_branches.*``, ``query_head.query_embedding``). The
  Co-DETR auxiliary parts (``rpn_head.*``, ``roi_head.*``, ``bbox_head.*``, ``query_head.downsample.*``,
  ``query_head.transformer.{aux_pos_trans*,pos_feats_*,head_pos_embed}``) are returned untouched in
  ``report.unmatched`` for the Co-DETR converter. The same function converts plain mmdet 2.x
  ``DeformableDETR`` checkpoints (``bbox_head.*`` instead of ``query_head.*``, see ``head_prefix``).
* :func:`convert_mmdet3_deformable` -- mmdet 3.x ``DeformableDETR`` (``encoder.*``, ``decoder.*``,
  ``memory_trans_*``, ``pos_trans_fc``, ``bbox_head.{cls,reg}_branches.*``, ``level_embed``).

Both return ``(state_dict, report)``; :class:`ConversionReport` lists matched pairs, unmatched source keys
(with their tensors) and, when ``target_keys`` is given, the target keys nothing was produced for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "ConversionReport",
    "convert_sense_x_co_deformable",
    "convert_mmdet3_deformable",
    "deformable_key_sense_x",
    "deformable_key_mmdet3",
    "backbone_key_map",
]

CO_DETR_AUX_PATTERNS = (
    r"^rpn_head\.", r"^roi_head\.", r"^bbox_head\.", r"^query_head\.downsample\.",
    r"\.transformer\.aux_pos_trans", r"\.transformer\.pos_feats_", r"\.transformer\.head_pos_embed",
)


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        matched: (source key, target key) pairs that were converted.
        aliases: converted keys dropped because they are exact duplicates (official shared heads are stored
            once per decoder layer; codetr keeps index 0), mapped to the key they duplicate.
        unmatched: source keys not converted, with their tensors (e.g. Co-DETR aux heads).
        missing: target keys (from ``target_keys``) that received no tensor.
        ignored: source keys deliberately dropped: BN ``num_batches_tracked`` counters and Swin's derived
            ``relative_position_index`` / ``attn_mask`` buffers, unless ``target_keys`` contains them.
    """

    matched: list[tuple[str, str]] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    unmatched: dict[str, Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.matched)} matched, {len(self.aliases)} duplicate aliases, "
                f"{len(self.unmatched)} unmatched source keys, {len(self.missing)} missing target keys, "
                f"{len(self.ignored)} ignored")


# --------------------------------------------------------------------------- variant key maps
_BRANCH = re.compile(r"^(cls|reg)_branches\.(\d+)\.(.*)$")
_REG_LAYER = {"0": "0", "2": "1", "4": "2"}  # Sequential(Linear, ReLU, Linear, ReLU, Linear) -> MLP.layers


def _branch_key(rest: str) -> str | None:
    m = _BRANCH.match(rest)
    if not m:
        return None
    kind, idx, tail = m.groups()
    if kind == "cls":
        return f"class_heads.{idx}.{tail}"
    sub, _, param = tail.partition(".")
    if sub not in _REG_LAYER:
        return None
    return f"box_heads.{idx}.layers.{_REG_LAYER[sub]}.{param}"


_FFN_MMCV = {"layers.0.0.": "fc1.", "layers.1.": "fc2."}
_NORMS_ENC = {"0": "norm1", "1": "norm2"}
_NORMS_DEC = {"0": "norm1", "1": "norm2", "2": "norm3"}


def _ffn(tail: str) -> str | None:
    for src, dst in _FFN_MMCV.items():
        if tail.startswith(src):
            return "ffn." + dst + tail[len(src):]
    return None


# per-layer source prefixes -> codetr names: (ffn, encoder self-attn, decoder self-attn, decoder cross-attn)
_LAYOUT_MMDET2 = ("ffns.0.", "attentions.0.", "attentions.0.attn.", "attentions.1.")
_LAYOUT_MMDET3 = ("ffn.", "self_attn.", "self_attn.attn.", "cross_attn.")
_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$")


def _layer_key(key: str, layout: tuple[str, str, str, str]) -> str | None:
    """``{encoder,decoder}.layers.<i>.<tail>`` of one official layout -> codetr layer key (None: not a layer key)."""
    m = _LAYER.match(key)
    if not m:
        return None
    part, idx, tail = m.groups()
    pre = f"{part}.layers.{idx}."
    ffn, enc_self, dec_self, dec_cross = layout
    if tail.startswith(ffn):
        f = _ffn(tail[len(ffn):])
        return pre + f if f else None
    if (mn := re.match(r"^norms\.(\d+)\.(.*)$", tail)):
        names = _NORMS_ENC if part == "encoder" else _NORMS_DEC
        return pre + f"{names[mn.group(1)]}.{mn.group(2)}" if mn.group(1) in names else None
    renames = ((enc_self, "self_attn."),) if part == "encoder" else ((dec_self, "self_attn."), (dec_cross, "cross_attn."))
    for src, dst in renames:
        if tail.startswith(src):
            return pre + dst + tail[len(src):]
    return None


def deformable_key_sense_x(key: str) -> str | None:
    """Key inside ``query_head.`` (mmdet 2.x ``DeformableDETRHead`` / ``CoDeformDETRHead``) -> variant key."""
    if (b := _branch_key(key)) is not None:
        return b
    if key == "query_embedding.weight":
        return key
    if not key.startswith("transformer."):
        return None
    k = key[len("transformer."):]
    simple = {"level_embeds": "level_embed"}
    if k in simple:
        return simple[k]
    for name in ("enc_output.", "enc_output_norm.", "pos_trans.", "pos_trans_norm.", "reference_points."):
        if k.startswith(name):
            return k
    return _layer_key(k, _LAYOUT_MMDET2)


def deformable_key_mmdet3(key: str) -> str | None:
    """mmdet 3.x ``DeformableDETR`` key (without ``backbone.``/``neck.``) -> variant key."""
    if key.startswith("bbox_head."):
        return _branch_key(key[len("bbox_head."):])
    simple = {"level_embed": "level_embed", "query_embedding.weight": "query_embedding.weight"}
    if key in simple:
        return simple[key]
    for src, dst in (("memory_trans_fc.", "enc_output."), ("memory_trans_norm.", "enc_output_norm."),
                     ("pos_trans_fc.", "pos_trans."), ("pos_trans_norm.", "pos_trans_norm."),
                     ("reference_points_fc.", "reference_points.")):
        if key.startswith(src):
            return dst + key[len(src):]
    return _layer_key(key, _LAYOUT_MMDET3)


# --------------------------------------------------------------------------- backbone / neck
def _single(key_map: Callable[[dict[str, Tensor]], dict[str, Tensor]], key: str) -> str | None:
    """Run a whole-state-dict key map (the backbone / neck packages' ``official_*_key_map``) on one key."""
    mapped = key_map({key: torch.empty(0)})
    return next(iter(mapped), None)


def _backbone_key(key: str) -> str | None:
    """Official ``backbone.*`` key -> codetr key without the prefix (mmdet and torchvision names agree)."""
    from codetr.backbones.resnet import official_resnet_key_map

    return _single(official_resnet_key_map, key)


BackboneKeyMap = Callable[[str, Tensor], "tuple[str | None, Tensor]"]

# buffers derived from the architecture: dropped unless the target model stores them
DERIVED_BUFFERS = ("num_batches_tracked", "relative_position_index", "attn_mask")


def backbone_key_map(backbone: str) -> BackboneKeyMap:
    """The per-key map for official ``backbone.*`` tensors of a recipe's ``model.backbone.type``.

    The returned function takes a key *without* the ``backbone.`` prefix and its tensor and returns the codetr
    backbone key (``None``: no counterpart) and the (possibly re-laid-out) tensor:

    * ``resnet``: mmdet / torchvision names (identical);
    * ``swin``: official Co-DETR ``SwinTransformerV1`` names (``layers.*``, kept) or mmdet ``SwinTransformer``
      names (``stages.*``, ``attn.w_msa``, ``ffn.layers``, ``patch_embed.projection``; patch-merging weights are
      permuted from ``nn.Unfold`` order), as :func:`codetr.backbones.swin_weights.official_swin_key_map`;
    * anything else (a plugin backbone): names kept as they are.
    """
    if backbone == "resnet":
        return lambda key, value: (_backbone_key("backbone." + key), value)
    if backbone == "swin":
        from codetr.backbones.swin_weights import swin_key_from_official

        return swin_key_from_official
    return lambda key, value: (key, value)


def _neck_key(key: str) -> str | None:
    from codetr.necks.channel_mapper import official_channel_mapper_key_map

    return _single(official_channel_mapper_key_map, key)


# --------------------------------------------------------------------------- drivers
def _unwrap(sd: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            return sd[wrapper]
    return sd


def map_state_dict(sd: Mapping[str, Tensor], key_map: Callable[[str], str | None], *,
                   target_keys: Iterable[str] | None = None, backbone: str = "resnet"
                   ) -> tuple[dict[str, Tensor], ConversionReport]:
    """The one walk over an official state dict that every layout's converter uses.

    A checkpoint wrapper (``state_dict`` / ``model``) and DDP's ``module.`` prefix are removed; then every
    key goes: ``backbone.*`` through :func:`backbone_key_map` (which may also transform the value),
    ``neck.*`` to the ChannelMapper names, any other key through ``key_map`` (full official key -> full
    codetr key, or None). Unmapped keys land in ``report.unmatched`` with their tensors; derived buffers
    (BN step counters, Swin index buffers) the target does not have go to ``report.ignored``.
    ``report.missing`` is left to :func:`finish_report` (callers may still fold keys).

    Raises:
        ValueError: two source keys map to the same codetr key.
    """
    bb_map = backbone_key_map(backbone)
    target_set = None if target_keys is None else set(target_keys)
    out: dict[str, Tensor] = {}
    report = ConversionReport()
    for key, value in _unwrap(sd).items():
        if key.startswith("module."):
            key = key[len("module."):]
        dst: str | None
        if key.startswith("backbone."):
            sub, value = bb_map(key[len("backbone."):], value)
            dst = None if sub is None else "backbone." + sub
        elif key.startswith("neck."):
            sub = _neck_key(key)
            dst = None if sub is None else "neck." + sub
        else:
            dst = key_map(key)
        if dst is None:
            report.unmatched[key] = value
        elif dst.endswith(DERIVED_BUFFERS) and (target_set is None or dst not in target_set):
            report.ignored.append(key)  # BN step counter / Swin index buffers: no effect on the model
        elif dst in out:
            raise ValueError(f"two source keys map to {dst!r} (the second is {key!r})")
        else:
            out[dst] = value
            report.matched.append((key, dst))
    return out, report


def finish_report(out: dict[str, Tensor], report: ConversionReport, target_keys: Iterable[str] | None
                  ) -> tuple[dict[str, Tensor], ConversionReport]:
    """Fill ``report.missing`` (target keys nothing was produced for) when ``target_keys`` is given."""
    if target_keys is not None:
        report.missing = sorted(set(target_keys) - set(out))
    return out, report


def _convert(sd: Mapping[str, Tensor], variant_key: Callable[[str], str | None], variant_prefix: str,
             keep_unmatched: tuple[str, ...], shared_heads: bool | None,
             target_keys: Iterable[str] | None, backbone: str = "resnet") -> tuple[dict[str, Tensor], ConversionReport]:
    """Deformable-DETR layouts: ``variant_prefix`` keys through ``variant_key``; ``keep_unmatched`` patterns
    (the Co-DETR aux parts) stay unmatched for the Co-DETR converter; shared heads folded afterwards."""
    target_keys = None if target_keys is None else list(target_keys)
    aux = [re.compile(p) for p in keep_unmatched]

    def key_map(key: str) -> str | None:
        if any(p.search(key) for p in aux) or not key.startswith(variant_prefix):
            return None
        sub = variant_key(key[len(variant_prefix):])
        return None if sub is None else "variant." + sub

    out, report = map_state_dict(sd, key_map, target_keys=target_keys, backbone=backbone)
    _fold_shared_heads(out, report, shared_heads)
    return finish_report(out, report, target_keys)


_HEAD = re.compile(r"^variant\.(class_heads|box_heads)\.(\d+)\.(.*)$")


def _fold_shared_heads(out: dict[str, Tensor], report: ConversionReport, shared: bool | None) -> None:
    """Official shared heads are one module repeated in a ModuleList (one copy per layer in the file);
    codetr stores a shared head once (index 0). ``shared=None`` detects it: all copies identical."""
    groups: dict[str, dict[int, str]] = {}
    for k in out:
        m = _HEAD.match(k)
        if m:
            groups.setdefault(f"{m.group(1)}|{m.group(3)}", {})[int(m.group(2))] = k
    if not groups or shared is False:
        return
    identical = all(len(idx) > 1 and all(torch.equal(out[idx[0]], out[k]) for k in idx.values())
                    for idx in groups.values() if 0 in idx)
    if shared is None and not identical:
        return
    if shared and not identical:
        raise ValueError("shared_heads=True but the per-layer head copies differ")
    for idx in groups.values():
        for i, k in idx.items():
            if i != 0:
                report.aliases[k] = idx[0]
                del out[k]
    report.matched = [(s, d) for s, d in report.matched if d in out]


def convert_sense_x_co_deformable(sd: Mapping[str, Tensor], *, head_prefix: str = "query_head.",
                                  shared_heads: bool | None = None, target_keys: Iterable[str] | None = None,
                                  backbone: str = "resnet") -> tuple[dict[str, Tensor], ConversionReport]:
    """Sense-X Co-Deformable-DETR (or mmdet 2.x Deformable-DETR with ``head_prefix="bbox_head."``).

    Args:
        sd: the official state dict (a checkpoint dict with ``state_dict`` is unwrapped).
        head_prefix: ``"query_head."`` (Co-DETR) or ``"bbox_head."`` (mmdet 2.x ``DeformableDETR``).
        shared_heads: official heads shared across layers (no box refinement): True/False, or None to
            detect (all per-layer copies identical).
        target_keys: codetr model keys (``model.state_dict().keys()``) to report missing ones.
        backbone: the recipe's ``model.backbone.type`` (``resnet``, ``swin``; see :func:`backbone_key_map`).
    """
    keep = CO_DETR_AUX_PATTERNS if head_prefix == "query_head." else ()
    return _convert(sd, deformable_key_sense_x, head_prefix, keep, shared_heads, target_keys, backbone)


def convert_mmdet3_deformable(sd: Mapping[str, Tensor], *, shared_heads: bool | None = None,
                              target_keys: Iterable[str] | None = None, backbone: str = "resnet"
                              ) -> tuple[dict[str, Tensor], ConversionReport]:
    """mmdet 3.x ``DeformableDETR`` (plain, ``with_box_refine``, ``as_two_stage``) state dict."""
    return _convert(sd, deformable_key_mmdet3, "", (), shared_heads, target_keys, backbone)
