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

from codetr.core.interfaces import AuxHead, DETRVariant, FeaturePyramid, Memory, QueryEncoder
from codetr.core.structures import Batch, Detections, level_masks

__all__ = ["CollaborativeBranch"]


class CollaborativeBranch(nn.Module):
    """Adapter + K aux heads + customized positive queries.

    Args:
        adapter: module ``(memory_levels: list[Tensor], masks: list[Tensor], strides: list[int]) -> FeaturePyramid``.
        heads: the K aux heads, in head-index order.
        query_encoder: builds the K query groups, or None to train the aux heads only (paper Table 6
            "aux head only" ablation).
        lambda_1: weight of the customized-positive-query losses.
        min_pos/max_pos: see :func:`codetr.heads.positive_queries.select_positive_queries`.
    """

    def __init__(self, adapter: nn.Module, heads: list[AuxHead], query_encoder: QueryEncoder | None,
                 lambda_1: float = 1.0, with_heads_loss: bool = True):
        super().__init__()
        self.adapter = adapter
        self.heads = nn.ModuleList(heads)
        self.query_encoder = query_encoder
        self.lambda_1 = lambda_1
        self.with_heads_loss = with_heads_loss

    def pyramid(self, memory: Memory, batch: Batch) -> FeaturePyramid:
        levels = memory.levels()
        return self.adapter(levels, level_masks(batch.masks, [tuple(x.shape[-2:]) for x in levels]),
                            list(memory.inputs.strides))

    def loss(self, memory: Memory, batch: Batch, variant: DETRVariant, criterion: nn.Module) -> dict[str, Tensor]:
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

    def predict(self, memory: Memory, batch: Batch, eval_module: str) -> list[Detections]:
        """Detections of an aux head for analysis (``one-stage`` = ATSS-like dense head, ``two-stage`` = R-CNN)."""
        tag = {"one-stage": "atss", "two-stage": "rcnn"}[eval_module]
        for head in self.heads:
            if head.tag == tag:
                return head.predict(self.pyramid(memory, batch), batch)
        raise ValueError(f"eval_module={eval_module!r} needs an aux head with tag {tag!r}; "
                         f"this model has {[h.tag for h in self.heads]}")
