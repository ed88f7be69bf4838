"""Co-DETR's collaborative hybrid assignment branch (training-time only).

Order of operations per training step (official ``CoDETR.forward_train``, co_detr.md §B1):

1. the one-to-one branch has run (``Detector.loss``) and produced the encoder :class:`Memory`;
2. the multi-scale adapter splits the memory back into per-level maps and adds one stride-2 level ->
   the auxiliary :class:`FeaturePyramid`;
3. every aux head ``k`` (recipe order = official ``head_idx``: put Faster R-CNN before ATSS to match the
   official K = 2 numbering) computes its one-to-many losses (already multiplied by
   ``lambda_2 * num_decoder_layers`` through the head's ``loss_scale``) and its :class:`PositiveCoords`;
4. for every head, the :class:`QueryEncoder` builds query group ``aux{k}`` (positives + random-negative
   padding) and the variant's **shared** decoder decodes it over the same memory (no encoder re-run, no
   matching); the criterion computes fixed-target losses on every decoder layer, times ``lambda_1``.

Loss names: aux head ``k``'s terms are prefixed ``aux{k}.`` (e.g. ``aux1.loss_cls``, ``aux0.loss_rpn_cls``);
query group ``k`` uses the official names ``loss_{cls,bbox,iou}_aux{k}`` / ``d{i}.loss_*_aux{k}``.
"""

from __future__ import annotations

from torch import Tensor, nn

from codetr.core.interfaces import AuxHead, Criterion, DETRVariant, FeaturePyramid, Memory, QueryEncoder
from codetr.core.structures import Batch, Detections, level_masks

__all__ = ["CollaborativeBranch", "OFFICIAL_EVAL_MODULES"]

#: official ``eval_module`` names -> the aux-head tag they select (Co-DETR ``eval_module`` one-stage / two-stage)
OFFICIAL_EVAL_MODULES = {"one-stage": "atss", "two-stage": "rcnn"}


class CollaborativeBranch(nn.Module):
    """Adapter + K aux heads + customized positive queries.

    Args:
        adapter: module ``(memory_levels: list[Tensor], masks: list[Tensor], strides: list[int]) -> FeaturePyramid``.
        heads: the K aux heads, in head-index order.
        query_encoder: builds the K query groups (positive selection and padding live there, see
            :mod:`codetr.heads.positive_queries`), or None to train the aux heads only (paper Table 6
            "aux head only" ablation).
        lambda_1: weight of the customized-positive-query losses.
        with_heads_loss: False keeps the aux heads' own losses at zero weight (only their positive queries
            train), an ablation.
        head_types: the recipe ``type`` of every head (``aux_heads[k].type``), so :meth:`head_index` can
            select a head by type; None = unknown (selection by index, ``aux{k}`` or tag only).
    """

    def __init__(self, adapter: nn.Module, heads: list[AuxHead], query_encoder: QueryEncoder | None,
                 lambda_1: float = 1.0, with_heads_loss: bool = True, head_types: list[str] | None = None):
        super().__init__()
        if head_types is not None and len(head_types) != len(heads):
            raise ValueError(f"{len(head_types)} head types for {len(heads)} aux heads")
        self.adapter = adapter
        self.heads = nn.ModuleList(heads)
        self.query_encoder = query_encoder
        self.lambda_1 = lambda_1
        self.with_heads_loss = with_heads_loss
        self.head_types = list(head_types) if head_types is not None else [None] * len(heads)

    def pyramid(self, memory: Memory, batch: Batch) -> FeaturePyramid:
        levels = memory.levels()
        return self.adapter(levels, level_masks(batch.masks, [tuple(x.shape[-2:]) for x in levels]),
                            list(memory.inputs.strides))

    def loss(self, memory: Memory, batch: Batch, variant: DETRVariant, criterion: Criterion) -> dict[str, Tensor]:
        pyramid = self.pyramid(memory, batch)
        losses: dict[str, Tensor] = {}
        positives = []
        for k, head in enumerate(self.heads):
            out = head.loss(pyramid, batch)
            for name, value in out.losses.items():
                losses[f"aux{k}.{name}"] = value if self.with_heads_loss else value * 0.0
            positives.append(out.positives)
        if self.query_encoder is not None:
            for k, coords in enumerate(positives):
                group, targets = self.query_encoder(coords, k, memory, pyramid, batch)
                outputs = variant.decode(group, memory)
                losses.update(criterion.aux_group_loss(outputs, targets, f"_aux{k}", image_sizes=batch.image_sizes,
                                                       weight=self.lambda_1))
        return losses

    def head_index(self, eval_module: str | int) -> int:
        """The aux head ``eval_module`` names: its index ``k`` (int or ``"aux{k}"``), its recipe type (e.g.
        ``atss``, ``faster_rcnn``, a plugin's type) or tag, or the official ``one-stage`` (first head tagged
        ``atss``) / ``two-stage`` (first head tagged ``rcnn``). Raises ``ValueError`` listing the choices
        when no head matches or the head has no standalone ``predict``."""
        tags = [h.tag for h in self.heads]
        k: int | None = None
        if isinstance(eval_module, int) or (isinstance(eval_module, str) and eval_module.isdigit()):
            k = int(eval_module)
        elif eval_module.startswith("aux") and eval_module[3:].isdigit():
            k = int(eval_module[3:])
        else:
            name = OFFICIAL_EVAL_MODULES.get(eval_module, eval_module)
            k = next((i for i, (t, ty) in enumerate(zip(tags, self.head_types)) if name in (t, ty)), None)
        choices = (f"0..{len(self.heads) - 1}, aux0.., one of the types {self.head_types} or tags {tags}, "
                   f"or {sorted(OFFICIAL_EVAL_MODULES)}")
        if k is None or not 0 <= k < len(self.heads):
            raise ValueError(f"model.co_detr.eval_module={eval_module!r} names no aux head of this model; "
                             f"choose {choices} (or 'detr')")
        if type(self.heads[k]).predict is AuxHead.predict:
            raise ValueError(f"model.co_detr.eval_module={eval_module!r}: aux head {k} "
                             f"({type(self.heads[k]).__name__}) has no standalone predict()")
        return k

    def predict(self, memory: Memory, batch: Batch, eval_module: str | int) -> list[Detections]:
        """Detections of one aux head (chosen as in :meth:`head_index`), network-input frame, for analysis."""
        return self.heads[self.head_index(eval_module)].predict(self.pyramid(memory, batch), batch)
