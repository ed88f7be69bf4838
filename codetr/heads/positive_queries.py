"""Customized positive queries (Co-DETR paper eq. 4-6): aux-head positives -> extra decoder query groups.

Two steps, kept apart so each is testable:

1. :func:`select_positive_queries` — the official ``get_aux_targets``: per aux head and batch,
   ``P = max(min_pos, min(max_pos, max #positives over the images))`` queries per image; positives beyond
   ``P`` are randomly sub-sampled, missing ones are padded with **random negatives of the same head**
   (label = background, label weight 1, box weight 0). Reference boxes (the anchors / proposals, never the
   GT) and targets (the assigned GT) become normalised cxcywh relative to each image's valid size.
2. :class:`PositiveQueryEncoder` — embeds the reference boxes into decoder queries:

   * ``flavour="deformable"`` (Co-Deformable-DETR): ``t = LN_k(Linear_k(PE(box)))`` with ``2C`` outputs;
     positional query = first half (+ the per-head ``head_pos_embed``), content = second half
     (+ ``LN'_k(Linear'_k(feat))`` when ``with_coord_feat``).
   * ``flavour="dino"`` (Co-DINO): content = ``LN_k(Linear_k(PE(box)))`` (``C`` outputs), no explicit
     positional query (the DINO decoder derives it from the reference box at every layer); the official
     Co-DINO configs set ``with_coord_feat=False``. Checked against the official training-mode aux-group
     outputs in ``tests/integration/test_co_dino_parity.py``.

   * ``flavour="conditional"`` (Co-Conditional-DETR, our design: the official code has no Co- single-scale
     variants): as ``"deformable"`` (positional query + content from the sine embedding of the positive box);
     the Conditional-DETR decoder takes the box centre as its fixed 2-D reference point.
   * ``flavour="dab"`` (Co-DAB-DETR, our design): as ``"dino"``: content from the box embedding, the 4-D anchor
     = the positive box, the positional query derived from it at every layer by the DAB decoder.

   ``PE`` is the 4 x 128 sine embedding of (cx, cy, w, h) (temperature 10000), i.e. ``2C`` = 512 channels
   for ``C`` = 256.

``head_pos_embed`` (Deformable flavour): the official code builds ``nn.Embedding(num_heads, 1, 1, C)`` by
mistake, so a single learned **scalar** per head is broadcast over all channels; ``"scalar"`` reproduces it
(the default, needed for official weights), ``"vector"`` is the intended (num_heads, C) table, ``"none"``
drops it. See docs/deviations.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from codetr.core.interfaces import AuxTargets, FeaturePyramid, Memory, PositiveCoords, QueryEncoder, QueryGroup
from codetr.core.registry import Component, ComponentConfig
from codetr.core.structures import Batch, xyxy_to_cxcywh
from codetr.ops.functional import inverse_sigmoid
from codetr.ops.position import sine_box_embedding

__all__ = ["PositiveQueriesConfig", "SelectedQueries", "select_positive_queries", "PositiveQueryEncoder",
           "COMPONENT"]


@dataclass
class SelectedQueries:
    """Output of :func:`select_positive_queries` for one aux head.

    Attributes:
        reference: (B, P, 4) normalised cxcywh reference boxes (anchors / proposals).
        feats: (B, P, C) per-query features, or None when the head provides none.
        targets: :class:`AuxTargets` with labels (B, P) (background = num_classes), boxes (B, P, 4)
            normalised cxcywh, label/box weights (B, P), and the number of positives.
    """

    reference: Tensor
    feats: Tensor | None
    targets: AuxTargets


def select_positive_queries(coords: PositiveCoords, image_sizes: Tensor, num_classes: int, min_pos: int = 9,
                            max_pos: int = 300, generator: torch.Generator | None = None) -> SelectedQueries:
    """Official ``get_aux_targets`` (see module docstring).

    Args:
        coords: candidates of one aux head (B per-image lists, absolute xyxy, labels with bg = num_classes).
        image_sizes: (B, 2) valid (h, w) used to normalise boxes.
        generator: RNG for sub-sampling / negative padding (CPU generator; None = global RNG).

    When an image has fewer negatives than padding slots (possible for heads with few candidates),
    the remaining rows are zero boxes with label weight 0 (the official code would fail and fall
    back to a zero loss for the whole group; see docs/deviations.md).
    """
    bsz = len(coords.labels)
    device = image_sizes.device
    pos_idx = [((lab >= 0) & (lab < num_classes)).nonzero().squeeze(1) for lab in coords.labels]
    num = max([len(p) for p in pos_idx], default=0)
    num = max(min_pos, min(max_pos, num))
    ref_out, tgt_out, lab_out, feat_out = [], [], [], []
    label_w = torch.ones(bsz, num, device=device)
    box_w = torch.zeros(bsz, num, device=device)
    num_pos = 0
    for b in range(bsz):
        labels = coords.labels[b]
        h, w = image_sizes[b].tolist()
        factor = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        pos = pos_idx[b]
        if len(pos) > num:
            pos = pos[torch.randperm(len(pos), generator=generator)[:num].to(pos.device)]
        npos = len(pos)
        num_pos += npos
        idx = pos
        if npos < num:
            neg = (labels == num_classes).nonzero().squeeze(1)
            neg = neg[torch.randperm(len(neg), generator=generator)[: num - npos].to(neg.device)]
            idx = torch.cat([pos, neg])
        box_w[b, :npos] = 1
        ref = xyxy_to_cxcywh(coords.ref_boxes_xyxy[b][idx].float() / factor)
        tgt = xyxy_to_cxcywh(coords.target_boxes_xyxy[b][idx].float() / factor)
        lab = labels[idx]
        feat = coords.feats[b][idx] if coords.feats is not None else None
        missing = num - len(idx)
        if missing:  # not enough negatives: zero rows that carry no loss
            label_w[b, len(idx):] = 0
            ref = torch.cat([ref, ref.new_zeros(missing, 4)])
            tgt = torch.cat([tgt, tgt.new_zeros(missing, 4)])
            lab = torch.cat([lab, lab.new_full((missing,), num_classes)])
            if feat is not None:
                feat = torch.cat([feat, feat.new_zeros(missing, feat.shape[-1])])
        ref_out.append(ref)
        tgt_out.append(tgt)
        lab_out.append(lab)
        if feat is not None:
            feat_out.append(feat)
    targets = AuxTargets(labels=torch.stack(lab_out), boxes=torch.stack(tgt_out), label_weights=label_w,
                         box_weights=box_w, num_pos=float(num_pos))
    feats = torch.stack(feat_out) if coords.feats is not None else None
    return SelectedQueries(reference=torch.stack(ref_out), feats=feats, targets=targets)


#: flavours whose groups carry an explicit positional query (the others leave ``QueryGroup.pos`` None)
EXPLICIT_POS_FLAVOURS = ("deformable", "conditional")


class PositiveQueriesConfig(ComponentConfig):
    type: Literal["positive_queries"] = "positive_queries"
    hidden_dim: int | None = None
    num_classes: int | None = None
    flavour: Literal["deformable", "dino", "conditional", "dab"] = Field(
        "deformable", description="query construction of the variant: explicit positional query (deformable, "
                                  "conditional) or derived from the reference box per layer (dino, dab)")
    with_coord_feat: bool = Field(True, description="add the projected per-coordinate feature to the content")
    head_pos_embed: Literal["scalar", "vector", "none"] = Field(
        "scalar", description="per-head positional offset (Deformable flavour): official scalar bug, intended vector, or none")
    pe_temperature: float = Field(10000, gt=0)
    min_pos_queries: int = Field(9, ge=1)
    max_pos_queries: int = Field(300, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> "PositiveQueriesConfig":
        if self.min_pos_queries > self.max_pos_queries:
            raise ValueError(f"min_pos_queries ({self.min_pos_queries}) must be <= max_pos_queries ({self.max_pos_queries})")
        return self


class PositiveQueryEncoder(QueryEncoder):
    """Builds query group ``aux{k}`` from aux head ``k``'s :class:`PositiveCoords` (see module docstring).

    Parameters per head ``k``: ``pos_trans[k]`` Linear(2C -> 2C | C) + ``pos_norm[k]``, and with
    ``with_coord_feat`` ``feat_trans[k]`` Linear(C -> C) + ``feat_norm[k]``; ``head_pos_embed`` (K, 1 | C).
    """

    def __init__(self, cfg: PositiveQueriesConfig, num_groups: int):
        super().__init__()
        cfg.require_shared("hidden_dim", "num_classes")
        c = cfg.hidden_dim
        self.cfg = cfg
        self.num_groups = num_groups
        #: the group carries a positional query (``QueryGroup.pos``): Deformable / Conditional decoders need one
        self.explicit_pos = cfg.flavour in EXPLICIT_POS_FLAVOURS
        out = 2 * c if self.explicit_pos else c
        self.pos_trans = nn.ModuleList(nn.Linear(2 * c, out) for _ in range(num_groups))
        self.pos_norm = nn.ModuleList(nn.LayerNorm(out) for _ in range(num_groups))
        if cfg.with_coord_feat:
            self.feat_trans = nn.ModuleList(nn.Linear(c, c) for _ in range(num_groups))
            self.feat_norm = nn.ModuleList(nn.LayerNorm(c) for _ in range(num_groups))
        if self.explicit_pos and cfg.head_pos_embed != "none":
            width = 1 if cfg.head_pos_embed == "scalar" else c
            self.head_pos_embed = nn.Parameter(torch.empty(num_groups, width))
        else:
            self.register_parameter("head_pos_embed", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in self.pos_trans:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.cfg.with_coord_feat:
            for lin in self.feat_trans:
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        if self.head_pos_embed is not None:
            # official: xavier_uniform_ over the (K, 1) table (fan_in 1, fan_out K)
            nn.init.xavier_uniform_(self.head_pos_embed)

    def embed(self, reference: Tensor, feats: Tensor | None, group: int) -> tuple[Tensor, Tensor | None]:
        """(B, P, 4) normalised cxcywh (+ (B, P, C) feats) -> content (B, P, C), pos (B, P, C) or None."""
        c = self.cfg.hidden_dim
        # the official code embeds sigmoid(inverse_sigmoid(box)): reproduce its clamping exactly
        boxes = inverse_sigmoid(reference).sigmoid()
        pe = sine_box_embedding(boxes, num_feats=c // 2, temperature=self.cfg.pe_temperature, order="xywh")
        t = self.pos_norm[group](self.pos_trans[group](pe.to(self.pos_trans[group].weight.dtype)))
        if self.explicit_pos:
            pos, content = t[..., :c], t[..., c:]
            if self.head_pos_embed is not None:
                pos = pos + self.head_pos_embed[group]
        else:
            pos, content = None, t
        if self.cfg.with_coord_feat:
            if feats is None:
                raise ValueError(f"aux head {group} gives no per-coordinate features but with_coord_feat is on; "
                                 "set model.query_encoder.with_coord_feat: false")
            content = content + self.feat_norm[group](self.feat_trans[group](feats))
        return content, pos

    def forward(self, coords: PositiveCoords, group: int, memory: Memory, pyramid: FeaturePyramid, batch: Batch,
                generator: torch.Generator | None = None) -> tuple[QueryGroup, AuxTargets]:
        if not 0 <= group < self.num_groups:
            raise IndexError(f"query group {group} out of range for {self.num_groups} aux heads")
        sel = select_positive_queries(coords, batch.image_sizes, self.cfg.num_classes, self.cfg.min_pos_queries,
                                      self.cfg.max_pos_queries, generator)
        content, pos = self.embed(sel.reference, sel.feats, group)
        reference = sel.reference
        if self.cfg.flavour == "dab":
            # DAB's decoder divides by the anchor's w, h (modulated attention): zero-size padding rows and boxes
            # sticking out of the image are brought into (0, 1) the way the embedding already sees them
            reference = inverse_sigmoid(reference).sigmoid()
        return QueryGroup(name=f"aux{group}", content=content, reference=reference, pos=pos), sel.targets


def build_positive_queries(cfg: PositiveQueriesConfig, num_groups: int) -> PositiveQueryEncoder:
    return PositiveQueryEncoder(cfg, num_groups)


COMPONENT = Component(config=PositiveQueriesConfig, build=build_positive_queries,
                      summary="Co-DETR customized positive queries (Deformable / DINO flavours)")
