"""Official Co-DETR checkpoints (Sense-X / MMDetection 2.x layout) -> codetr ``Detector`` state dicts.

The one-to-one part (backbone, neck, Deformable-DETR++ query head) goes through
:func:`codetr.convert.official.convert_sense_x_co_deformable`; this module maps the collaborative parts:

===============================================  ============================================================
official key                                     codetr key
===============================================  ============================================================
``query_head.downsample.{0,1}.*``                ``collaborative.adapter.downsample.{0,1}.*``
``rpn_head.*``, ``roi_head.<j>.*``               ``collaborative.heads.<i>.rpn_head.*`` / ``.roi_head.*``
``bbox_head.<j>.*`` (dense heads, e.g. ATSS)     ``collaborative.heads.<i>.*``
``query_head.transformer.aux_pos_trans.<k>``     ``collaborative.query_encoder.pos_trans.<k'>``
``...aux_pos_trans_norm.<k>``                    ``collaborative.query_encoder.pos_norm.<k'>``
``...pos_feats_trans.<k>`` / ``pos_feats_norm``  ``collaborative.query_encoder.feat_trans`` / ``feat_norm``
``...head_pos_embed.weight`` (K, 1)              ``collaborative.query_encoder.head_pos_embed`` (row k -> k')
===============================================  ============================================================

The official head index ``k`` numbers R-CNN heads first, then dense heads (co_detr.md §B1); codetr uses the
recipe's ``aux_heads`` order. ``aux_head_types`` (the recipe order of head types) gives the permutation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from codetr.convert.official import ConversionReport, convert_sense_x_co_deformable

__all__ = ["convert_sense_x_co_detr", "official_head_order"]

ROI_TYPES = ("faster_rcnn",)


def official_head_order(aux_head_types: Sequence[str]) -> list[int]:
    """Official head index -> codetr aux head index (R-CNN heads first, then dense heads, each in order)."""
    roi = [i for i, t in enumerate(aux_head_types) if t in ROI_TYPES]
    dense = [i for i, t in enumerate(aux_head_types) if t not in ROI_TYPES]
    if len(roi) > 1:
        raise ValueError("the official layout has one RPN: at most one faster_rcnn aux head can be converted")
    return roi + dense


_QUERY_ENC = {
    "aux_pos_trans": "pos_trans",
    "aux_pos_trans_norm": "pos_norm",
    "pos_feats_trans": "feat_trans",
    "pos_feats_norm": "feat_norm",
}
_QE_RE = re.compile(r"^query_head\.transformer\.(aux_pos_trans_norm|aux_pos_trans|pos_feats_trans|pos_feats_norm)\.(\d+)\.(.*)$")


def convert_sense_x_co_detr(sd: Mapping[str, Tensor], aux_head_types: Sequence[str], *,
                            target_keys: Sequence[str] | None = None, allow_unmatched: bool = False,
                            backbone: str = "resnet") -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert a full Sense-X Co-Deformable-DETR state dict.

    Args:
        sd: official state dict (or checkpoint with ``state_dict``).
        aux_head_types: the recipe's ``model.aux_heads[i].type`` in order, e.g. ``["faster_rcnn", "atss"]``.
        target_keys: codetr model keys, to report missing ones.
        allow_unmatched: otherwise any source key left unconverted raises ``ValueError`` listing them.
        backbone: the recipe's ``model.backbone.type`` (``resnet`` or ``swin``).
    """
    out, report = convert_sense_x_co_deformable(sd, backbone=backbone)
    order = official_head_order(aux_head_types)
    dense_ours = [i for i in order if aux_head_types[i] not in ROI_TYPES]
    roi_ours = [i for i in order if aux_head_types[i] in ROI_TYPES]
    leftover: dict[str, Tensor] = {}
    for key, value in report.unmatched.items():
        dst: str | None = None
        if key.startswith("query_head.downsample."):
            dst = "collaborative.adapter.downsample." + key[len("query_head.downsample."):]
        elif key.startswith(("rpn_head.", "roi_head.")) and roi_ours:
            sub = key if key.startswith("rpn_head.") else re.sub(r"^roi_head\.\d+\.", "roi_head.", key)
            dst = f"collaborative.heads.{roi_ours[0]}.{sub}"
        elif (m := re.match(r"^bbox_head\.(\d+)\.(.*)$", key)) and int(m.group(1)) < len(dense_ours):
            dst = f"collaborative.heads.{dense_ours[int(m.group(1))]}.{m.group(2)}"
        elif (m := _QE_RE.match(key)) and int(m.group(2)) < len(order):
            dst = f"collaborative.query_encoder.{_QUERY_ENC[m.group(1)]}.{order[int(m.group(2))]}.{m.group(3)}"
        elif key == "query_head.transformer.head_pos_embed.weight":
            if value.shape[0] != len(order):
                raise ValueError(f"{key} has {value.shape[0]} rows but the recipe has {len(order)} aux heads")
            table = torch.empty_like(value)
            for k, ours in enumerate(order):
                table[ours] = value[k]
            dst, value = "collaborative.query_encoder.head_pos_embed", table
        if dst is None:
            leftover[key] = value
        else:
            out[dst] = value
            report.matched.append((key, dst))
    report.unmatched = leftover
    if target_keys is not None:
        report.missing = sorted(set(target_keys) - set(out))
    if leftover and not allow_unmatched:
        raise ValueError(f"{len(leftover)} official keys have no codetr counterpart: {sorted(leftover)[:8]} ... "
                         "(check the recipe's aux_heads types/order, or pass --allow-unmatched / "
                         "allow_unmatched=True to keep only the converted part)")
    return out, report
