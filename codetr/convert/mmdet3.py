"""MMDetection 3.x DINO and CO-DETR (Co-DINO) checkpoints -> codetr ``Detector`` state dicts.

Two layouts (key lists: ``shared/reference-outputs/{dino,co_dino}_mmdet3_small/state_dict_keys.json``):

* :func:`convert_mmdet3_dino` -- mmdet 3.x ``DINO``: mmdet-3 transformer names, as Deformable-DETR
  (:func:`codetr.convert.official.deformable_key_mmdet3`) plus

  ===============================================  ================================================
  ``decoder.ref_point_head.layers.{0,1}.*``        ``variant.decoder.ref_point_head.layers.{0,1}.*``
  ``decoder.norm.*``                               ``variant.decoder.norm.*``
  ``query_embedding.weight``                       ``variant.query_embedding.weight``
  ``dn_query_generator.label_embedding.weight``    ``variant.denoising.label_embedding.weight``
  ===============================================  ================================================

* :func:`convert_mmdet3_co_dino` -- the mmdet 3.x ``projects/CO-DETR`` port (the Sense-X key layout: the query
  head keeps the mmdet-2 transformer names ``query_head.transformer.{encoder,decoder}.layers.{i}.{attentions,
  ffns,norms}``): the one-to-one part as :func:`codetr.convert.official.deformable_key_sense_x` plus

  * ``query_head.transformer.decoder.ref_point_head.{0,2}.*`` -> ``variant.decoder.ref_point_head.layers.{0,1}.*``
  * ``query_head.transformer.decoder.norm.*`` -> ``variant.decoder.norm.*``
  * ``query_head.transformer.query_embed.weight`` -> ``variant.query_embedding.weight``
  * ``query_head.dn_generator.label_embedding.weight`` (Sense-X mmdet 2: ``query_head.label_embedding.weight``)
    -> ``variant.denoising.label_embedding.weight``
  * ``query_head.downsample.*`` -> ``collaborative.adapter.downsample.*``
  * ``query_head.transformer.aux_pos_trans{,_norm}.<k>.*``
    -> ``collaborative.query_encoder.{pos_trans,pos_norm}.<k'>.*``
  * ``query_head.transformer.pos_feats_{trans,norm}.<k>.*``
    -> ``collaborative.query_encoder.{feat_trans,feat_norm}.<k'>.*``
  * ``rpn_head.*``, ``roi_head.0.*`` -> ``collaborative.heads.<i>.{rpn_head,roi_head}.*``
  * ``bbox_head.<j>.*`` (ATSS) -> ``collaborative.heads.<i>.*``

  The official head index ``k`` numbers R-CNN heads first, then dense heads; ``aux_head_types`` (the recipe's
  ``model.aux_heads[i].type`` in order) gives codetr's index ``k'`` / ``i``
  (:func:`codetr.convert.co_detr.official_head_order`).

Both return ``(state_dict, report)`` (:class:`codetr.convert.official.ConversionReport`); source keys that map
to nothing are an error unless ``allow_unmatched=True`` (they are then listed in ``report.unmatched``). BN
``num_batches_tracked`` counters and Swin index buffers are dropped unless ``target_keys`` contains them.
``backbone="swin"`` reads Swin backbones in either naming (official ``layers.*`` or mmdet ``stages.*``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import Tensor

from codetr.convert.co_detr import ROI_TYPES, official_head_order
from codetr.convert.official import (ConversionReport, deformable_key_mmdet3, deformable_key_sense_x,
                                     finish_report, map_state_dict)

__all__ = ["convert_mmdet3_dino", "convert_mmdet3_co_dino", "dino_key_mmdet3", "co_dino_query_head_key"]

_LABEL_EMBED = "denoising.label_embedding.weight"


def dino_key_mmdet3(key: str) -> str | None:
    """mmdet 3.x ``DINO`` key (without ``backbone.`` / ``neck.``) -> :class:`~codetr.variants.dino.DINO` key."""
    if key == "dn_query_generator.label_embedding.weight":
        return _LABEL_EMBED
    if (m := re.match(r"^decoder\.ref_point_head\.layers\.(\d+)\.(weight|bias)$", key)):
        return f"decoder.ref_point_head.layers.{m.group(1)}.{m.group(2)}"
    if (m := re.match(r"^decoder\.norm\.(weight|bias)$", key)):
        return f"decoder.norm.{m.group(1)}"
    if key.startswith(("pos_trans_fc.", "pos_trans_norm.", "reference_points_fc.")):
        return None  # Deformable-DETR only
    return deformable_key_mmdet3(key)


_REF_HEAD_SEQ = {"0": "0", "2": "1"}  # Sequential(Linear, ReLU, Linear) -> MLP.layers


def co_dino_query_head_key(key: str) -> str | None:
    """Key inside ``query_head.`` of a Co-DINO checkpoint (mmdet 3 port or Sense-X) -> DINO variant key."""
    if key in ("dn_generator.label_embedding.weight", "label_embedding.weight"):
        return _LABEL_EMBED
    if key == "transformer.query_embed.weight":
        return "query_embedding.weight"
    if (m := re.match(r"^transformer\.decoder\.ref_point_head\.(\d+)\.(weight|bias)$", key)):
        idx = _REF_HEAD_SEQ.get(m.group(1))
        return None if idx is None else f"decoder.ref_point_head.layers.{idx}.{m.group(2)}"
    if (m := re.match(r"^transformer\.decoder\.norm\.(weight|bias)$", key)):
        return f"decoder.norm.{m.group(1)}"
    if key.startswith(("transformer.pos_trans", "transformer.reference_points", "query_embedding.")):
        return None  # Co-Deformable-DETR only
    return deformable_key_sense_x(key)


def _convert_all(sd: Mapping[str, Tensor], key_map: Callable[[str], str | None], target_keys: Iterable[str] | None,
                 allow_unmatched: bool, backbone: str) -> tuple[dict[str, Tensor], ConversionReport]:
    """:func:`~codetr.convert.official.map_state_dict`, then refuse unconverted keys unless allowed."""
    target_keys = None if target_keys is None else list(target_keys)
    out, report = finish_report(*map_state_dict(sd, key_map, target_keys=target_keys, backbone=backbone),
                                target_keys)
    if report.unmatched and not allow_unmatched:
        keys = sorted(report.unmatched)
        raise ValueError(f"{len(keys)} official keys have no codetr counterpart: {keys[:8]}"
                         f"{' ...' if len(keys) > 8 else ''} (check the recipe (aux_heads types/order, with_dn) or "
                         "pass --allow-unmatched / allow_unmatched=True to keep only the converted part)")
    return out, report


def convert_mmdet3_dino(sd: Mapping[str, Tensor], *, target_keys: Iterable[str] | None = None,
                        allow_unmatched: bool = False, backbone: str = "resnet"
                        ) -> tuple[dict[str, Tensor], ConversionReport]:
    """mmdet 3.x ``DINO`` state dict -> codetr (``backbone.*``, ``neck.*``, ``variant.*``).

    Args:
        sd: the official state dict (a checkpoint with ``state_dict`` / ``model`` is unwrapped).
        target_keys: codetr model keys, to report missing ones (and keep BN counters that the model has).
        allow_unmatched: otherwise unconverted source keys raise ``ValueError``.
        backbone: the recipe's ``model.backbone.type``: ``resnet`` or ``swin`` (official or mmdet Swin names;
            :func:`codetr.convert.official.backbone_key_map`).
    """
    return _convert_all(sd, lambda k: None if (v := dino_key_mmdet3(k)) is None else "variant." + v,
                        target_keys, allow_unmatched, backbone)


def convert_mmdet3_co_dino(sd: Mapping[str, Tensor], aux_head_types: Sequence[str], *,
                           target_keys: Iterable[str] | None = None, allow_unmatched: bool = False,
                           backbone: str = "resnet") -> tuple[dict[str, Tensor], ConversionReport]:
    """Co-DINO state dict -> codetr, including the collaborative branch.

    Reads both official Co-DINO layouts: the mmdet 3.x ``projects/CO-DETR`` port (``CoDETR`` +
    ``CoDINOHead``, ``query_head.dn_generator.label_embedding``, mmdet Swin names) and Sense-X Co-DETR /
    mmdet 2.x (``query_head.label_embedding``, official ``SwinTransformerV1`` names); they differ only there.

    Args:
        sd: official state dict (or checkpoint).
        aux_head_types: the recipe's ``model.aux_heads[i].type`` in order, e.g. ``["faster_rcnn", "atss"]``
            (``[]`` converts the inference part only; the aux weights then are unmatched).
        target_keys / allow_unmatched / backbone: as :func:`convert_mmdet3_dino`.
    """
    from codetr.heads.adapter import official_adapter_key_map
    from codetr.heads.atss import official_atss_key_map
    from codetr.heads.faster_rcnn import official_faster_rcnn_key_map

    order = official_head_order(list(aux_head_types))      # official k -> ours
    roi_ours = [i for i in order if aux_head_types[i] in ROI_TYPES]
    dense_ours = [i for i in order if aux_head_types[i] not in ROI_TYPES]
    qe_names = {"aux_pos_trans": "pos_trans", "aux_pos_trans_norm": "pos_norm", "pos_feats_trans": "feat_trans",
                "pos_feats_norm": "feat_norm"}
    qe = re.compile(r"^query_head\.transformer\.(aux_pos_trans_norm|aux_pos_trans|pos_feats_trans|pos_feats_norm)"
                    r"\.(\d+)\.(.*)$")

    def key_map(key: str) -> str | None:
        if key.startswith("query_head.downsample."):
            sub = official_adapter_key_map(key)
            return None if sub is None else "collaborative.adapter." + sub
        if (m := qe.match(key)):
            k = int(m.group(2))
            if k >= len(order):
                return None
            return f"collaborative.query_encoder.{qe_names[m.group(1)]}.{order[k]}.{m.group(3)}"
        if key.startswith(("rpn_head.", "roi_head.")):
            if not roi_ours:
                return None
            sub = official_faster_rcnn_key_map(key, 0)
            return None if sub is None else f"collaborative.heads.{roi_ours[0]}.{sub}"
        if (m := re.match(r"^bbox_head\.(\d+)\.", key)):
            j = int(m.group(1))
            if j >= len(dense_ours):
                return None
            sub = official_atss_key_map(key, j)
            return None if sub is None else f"collaborative.heads.{dense_ours[j]}.{sub}"
        if key.startswith("query_head."):
            sub = co_dino_query_head_key(key[len("query_head."):])
            return None if sub is None else "variant." + sub
        return None

    return _convert_all(sd, key_map, target_keys, allow_unmatched, backbone)
