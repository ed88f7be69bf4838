"""Set criterion of the one-to-one (Hungarian) branch and of Co-DETR's customized positive query groups.

Numerics follow the official Co-DETR code (MMDetection 2.25 ``DETRHead`` / ``DeformableDETRHead`` /
``CoDeformDETRHead`` / ``CoDINOHead``; MMDetection 3.x is identical on these points) and are checked
against the stored official losses in ``tests/heads/test_criterion_parity.py``:

* every decoder layer is matched on its own (Hungarian, :mod:`codetr.assigners.hungarian`);
* classification: sigmoid focal loss (or QFL with the IoU of the detached matched prediction as the
  quality target) over **all** queries x classes, background = all-zero one-hot, summed and divided by
  ``cls_avg_factor`` = number of matched queries, averaged over ranks (``sync_cls_avg_factor``), >= 1;
* L1 on normalised cxcywh and GIoU (``1 - GIoU``) on pixel xyxy (boxes x the valid image size), summed
  over matched pairs and divided by the number of matched queries averaged over ranks, clamped >= 1;
* weights multiply the normalised sums (official: focal 2, L1 5, GIoU 2 for the Deformable family).

The number of matched queries is ``sum_b min(Q, N_b)``; it equals Deformable-DETR's ``num_boxes``
(number of GT boxes) whenever ``Q >= N_b``, which is always the case in practice, and the original
Deformable-DETR normalisation (``focal.mean(1).sum() / num_boxes * Q``) is the same number.

Loss names (all values already weighted; the detector just sums them)::

    loss_cls, loss_bbox, loss_iou               last decoder layer of the main (one-to-one) group
    d{i}.loss_cls, d{i}.loss_bbox, d{i}.loss_iou    decoder layer i (0-based), i < L - 1
    enc_loss_cls, enc_loss_bbox, enc_loss_iou   two-stage encoder proposals (enc_loss != "none")
    loss_{cls,bbox,iou}_aux{k}, d{i}.loss_{cls,bbox,iou}_aux{k}
                                                customized positive query group k
                                                (SetCriterion.aux_group_loss, suffix "_aux{k}")
    dn_loss_{cls,bbox,iou}, d{i}.dn_loss_*      denoising groups, if a variant uses
                                                SetCriterion.fixed_target_loss(prefix="dn_")
    loss_{cls,bbox,iou}_one2many, d{i}.loss_*_one2many
                                                H-Deformable-DETR's hybrid one-to-many queries
                                                (SetCriterion.repeated_target_loss: GT repeated k times,
                                                Hungarian-matched, normalised like the main group)

These are exactly the official Co-DETR / MMDetection key names (``loss_iou`` is the GIoU term), so
loss dicts compare key-by-key with official training logs and fixtures.

Encoder (two-stage) loss, from ``Memory.extras``: ``enc_logits`` (B, S, C or 1) and ``enc_boxes``
(B, S, 4) normalised cxcywh hold exactly the tokens the loss is computed on — every encoder token for
Deformable-DETR two-stage / Co-Deformable-DETR (``enc_loss="binary"``: all GT relabelled to class 0,
matching included), the selected top-k proposals for DINO / Co-DINO (``enc_loss="class"``: real labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from codetr.core.config.criterion import SetCriterionConfig
from codetr.core.dist import get_world_size, reduce_mean
from codetr.core.interfaces import (EXTRAS_ENC_BOXES, EXTRAS_ENC_LOGITS, AuxTargets, DecoderOutputs, MatchResult,
                                    OneToOneAssigner)
from codetr.core.registry import registry
from codetr.core.structures import Batch, cxcywh_to_xyxy, normalize_boxes
from codetr.heads.losses import aligned_iou, giou_loss, l1_loss, quality_focal_loss, sigmoid_focal_loss

__all__ = [
    "SetCriterionConfig",
    "SetCriterion",
    "CriterionResult",
    "ENC_LOGITS_KEY",
    "ENC_BOXES_KEY",
    "loss_name",
]

#: ``Memory.extras`` keys of the encoder-loss proposals (the same constants as :mod:`codetr.core.interfaces`).
ENC_LOGITS_KEY = EXTRAS_ENC_LOGITS
ENC_BOXES_KEY = EXTRAS_ENC_BOXES
_TERMS = ("cls", "bbox", "iou")


def loss_name(term: str, layer: int | None, num_layers: int, prefix: str = "", suffix: str = "") -> str:
    """Official key of one loss term: ``[d{layer}.]{prefix}loss_{term}{suffix}``.

    ``layer=None`` (encoder) or the last layer get no ``d{i}.`` prefix.
    """
    head = "" if layer is None or layer == num_layers - 1 else f"d{layer}."
    return f"{head}{prefix}loss_{term}{suffix}"


@dataclass
class CriterionResult:
    """Losses plus the matches that produced them (``"d{i}"`` per decoder layer, ``"enc"``)."""

    losses: dict[str, Tensor]
    matches: dict[str, list[MatchResult]] = field(default_factory=dict)


def _size_scale(image_sizes: Tensor) -> Tensor:
    """(B, 2) (h, w) -> (B, 4) (w, h, w, h) float32."""
    h, w = image_sizes.to(torch.float32).unbind(-1)
    return torch.stack([w, h, w, h], dim=-1)


class SetCriterion(nn.Module):
    """Hungarian-matched losses of the main query group (+ encoder proposals) and fixed-target group losses."""

    def __init__(self, cfg: SetCriterionConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SetCriterionConfig()
        self.matcher = registry.build("assigners", self.cfg.matcher)
        if not isinstance(self.matcher, OneToOneAssigner):
            raise ValueError(f"model.criterion.matcher: {self.cfg.matcher.type!r} builds a "
                             f"{type(self.matcher).__name__}, not a one-to-one matcher "
                             "(codetr.core.interfaces.OneToOneAssigner); the default is 'hungarian'")

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"cls={c.cls_loss}x{c.cls_weight}, bbox={c.bbox_weight}, giou={c.giou_weight}, "
                f"enc={c.enc_loss}, matcher={self.matcher!r}")

    # ------------------------------------------------------------------ targets
    @staticmethod
    def prepare_targets(batch: Batch, device: torch.device) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Non-crowd GT of each image: labels (N_b,), boxes (N_b, 4) normalised cxcywh; sizes (B, 2)."""
        labels, boxes = [], []
        sizes = batch.image_sizes.to(device)
        for b, t in enumerate(batch.targets):
            t = t.non_crowd().to(device)
            labels.append(t.labels.long())
            boxes.append(normalize_boxes(t.boxes.float(), sizes[b]))
        return labels, boxes, sizes

    def _normalisers(self, num_pos: float, device: torch.device) -> tuple[float, float]:
        """(cls_avg_factor, box_avg_factor), both >= 1, as in MMDetection ``DETRHead.loss_single``."""
        if get_world_size() == 1:
            mean = float(num_pos)
        else:
            mean = float(reduce_mean(torch.tensor([float(num_pos)], dtype=torch.float32, device=device)).item())
        cls = mean if self.cfg.sync_cls_avg_factor else float(num_pos)
        return max(cls, 1.0), max(mean, 1.0)

    # ------------------------------------------------------------------ matched losses
    def _classification(self, logits: Tensor, labels: Tensor, boxes: Tensor, target_boxes: Tensor,
                        pos_mask: Tensor) -> Tensor:
        """Summed (un-normalised, per-query weights not applied) classification loss per query: (B, Q)."""
        if self.cfg.cls_loss == "focal":
            return sigmoid_focal_loss(logits, labels, self.cfg.focal_alpha, self.cfg.focal_gamma).sum(-1)
        with torch.no_grad():
            iou = aligned_iou(cxcywh_to_xyxy(boxes.detach()), cxcywh_to_xyxy(target_boxes))
            scores = torch.where(pos_mask, iou, torch.zeros_like(iou))
        return quality_focal_loss(logits, labels, scores, self.cfg.qfl_beta)

    def _matched_losses(self, logits: Tensor, boxes: Tensor, matches: list[MatchResult], gt_labels: list[Tensor],
                        gt_boxes: list[Tensor], sizes: Tensor, norms: tuple[float, float],
                        relabel_zero: bool) -> dict[str, Tensor]:
        device = logits.device
        b, q, c = logits.shape
        logits, boxes = logits.float(), boxes.float()
        batch_idx = torch.cat([torch.full_like(m.pred_idx, i) for i, m in enumerate(matches)]).to(device)
        pred_idx = torch.cat([m.pred_idx for m in matches]).to(device)
        gt_idx = [m.gt_idx.to(device) for m in matches]
        tgt_boxes = torch.cat([gt_boxes[i][j] for i, j in enumerate(gt_idx)]).float()
        if relabel_zero:
            tgt_labels = torch.zeros(pred_idx.shape[0], dtype=torch.int64, device=device)
        else:
            tgt_labels = torch.cat([gt_labels[i][j] for i, j in enumerate(gt_idx)])
        num_matched = int(pred_idx.shape[0])

        labels = torch.full((b, q), c, dtype=torch.int64, device=device)
        labels[batch_idx, pred_idx] = tgt_labels
        full_targets = boxes.new_zeros(b, q, 4)
        full_targets[batch_idx, pred_idx] = tgt_boxes
        pos_mask = labels < c
        cls_norm, box_norm = norms

        loss_cls = self._classification(logits, labels, boxes, full_targets, pos_mask).sum() / cls_norm

        src = boxes[batch_idx, pred_idx]
        scale = _size_scale(sizes)[batch_idx]
        loss_bbox = l1_loss(src, tgt_boxes).sum() / box_norm
        loss_iou = giou_loss(cxcywh_to_xyxy(src) * scale, cxcywh_to_xyxy(tgt_boxes) * scale).sum() / box_norm
        if num_matched == 0:  # keep a (zero) gradient path to every box prediction
            zero = boxes.sum() * 0.0
            loss_bbox, loss_iou = loss_bbox + zero, loss_iou + zero
        return {"cls": self.cfg.cls_weight * loss_cls, "bbox": self.cfg.bbox_weight * loss_bbox,
                "iou": self.cfg.giou_weight * loss_iou}

    def _match(self, logits: Tensor, boxes: Tensor, gt_labels: list[Tensor], gt_boxes: list[Tensor],
               sizes: Tensor, relabel_zero: bool) -> list[MatchResult]:
        if relabel_zero:
            gt_labels = [torch.zeros_like(x) for x in gt_labels]
        return self.matcher.match_batch(logits.detach(), boxes.detach(), gt_labels, gt_boxes, sizes)

    # ------------------------------------------------------------------ public API
    def compute(self, outputs: DecoderOutputs, batch: Batch, extras: Mapping[str, Tensor] | None = None
                ) -> CriterionResult:
        """Per-layer matching + losses of the main group and (if configured) the encoder proposals."""
        device = outputs.logits.device
        gt_labels, gt_boxes, sizes = self.prepare_targets(batch, device)
        losses: dict[str, Tensor] = {}
        matches: dict[str, list[MatchResult]] = {}

        if self.cfg.enc_loss != "none":
            extras = extras or {}
            if ENC_LOGITS_KEY not in extras or ENC_BOXES_KEY not in extras:
                raise ValueError(
                    f"SetCriterion(enc_loss={self.cfg.enc_loss!r}) needs Memory.extras[{ENC_LOGITS_KEY!r}] and "
                    f"[{ENC_BOXES_KEY!r}] (two-stage proposals); this variant provides {sorted(extras)}. "
                    "Set criterion.enc_loss: none for one-stage variants.")
            enc_logits, enc_boxes = extras[ENC_LOGITS_KEY], extras[ENC_BOXES_KEY]
            binary = self.cfg.enc_loss == "binary"
            s = enc_logits.shape[1]
            norms = self._normalisers(sum(min(s, len(x)) for x in gt_labels), device)
            m = self._match(enc_logits, enc_boxes, gt_labels, gt_boxes, sizes, binary)
            matches["enc"] = m
            for term, v in self._matched_losses(enc_logits, enc_boxes, m, gt_labels, gt_boxes, sizes, norms,
                                                binary).items():
                losses[loss_name(term, None, 1, prefix="enc_")] = v

        layer_losses, layer_matches = self._per_layer(outputs, gt_labels, gt_boxes, sizes)
        losses.update(layer_losses)
        matches.update(layer_matches)
        return CriterionResult(losses=losses, matches=matches)

    def _per_layer(self, outputs: DecoderOutputs, gt_labels: list[Tensor], gt_boxes: list[Tensor], sizes: Tensor,
                   suffix: str = "", weight: float = 1.0) -> tuple[dict[str, Tensor], dict[str, list[MatchResult]]]:
        """Hungarian matching + matched losses on every decoder layer (``[d{i}.]loss_*{suffix}`` x ``weight``)."""
        logits_all, boxes_all = outputs.logits, outputs.boxes
        num_layers, _, q = logits_all.shape[:3]
        norms = self._normalisers(sum(min(q, len(x)) for x in gt_labels), logits_all.device)
        losses: dict[str, Tensor] = {}
        matches: dict[str, list[MatchResult]] = {}
        for layer in range(num_layers):
            m = self._match(logits_all[layer], boxes_all[layer], gt_labels, gt_boxes, sizes, False)
            matches[f"d{layer}"] = m
            for term, v in self._matched_losses(logits_all[layer], boxes_all[layer], m, gt_labels, gt_boxes, sizes,
                                                norms, False).items():
                losses[loss_name(term, layer, num_layers, suffix=suffix)] = v if weight == 1.0 else weight * v
        return losses, matches

    def repeated_target_loss(self, outputs: DecoderOutputs, batch: Batch, repeat: int, *, suffix: str,
                             weight: float = 1.0) -> dict[str, Tensor]:
        """One-to-many Hungarian losses (H-DETR's hybrid branch): every non-crowd GT of each image repeated
        ``repeat`` times (``labels.repeat(k)``, ``boxes.repeat(k, 1)``), matched per decoder layer by the same
        matcher, normalised by the number of matched queries, names ``[d{i}.]loss_{cls,bbox,iou}{suffix}``
        (e.g. ``suffix="_one2many"``), times ``weight``. No encoder term."""
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        device = outputs.logits.device
        gt_labels, gt_boxes, sizes = self.prepare_targets(batch, device)
        gt_labels = [x.repeat(repeat) for x in gt_labels]
        gt_boxes = [x.repeat(repeat, 1) for x in gt_boxes]
        return self._per_layer(outputs, gt_labels, gt_boxes, sizes, suffix=suffix, weight=weight)[0]

    def forward(self, outputs: DecoderOutputs, batch: Batch, extras: Mapping[str, Tensor] | None = None
                ) -> dict[str, Tensor]:
        """Losses of the main group: ``outputs`` of the "main" query group, ``extras`` = ``Memory.extras``."""
        return self.compute(outputs, batch, extras).losses

    def aux_group_loss(self, outputs: DecoderOutputs, targets: AuxTargets, suffix: str,
                       image_sizes: Tensor | None = None, weight: float = 1.0) -> dict[str, Tensor]:
        """Losses of a customized positive query group (Co-DETR ``loss_aux``), every decoder layer.

        Co-DETR ``loss_single_aux``: no matching; classification over all P queries weighted by
        ``label_weights`` (padding negatives count as background), L1 / GIoU weighted by ``box_weights``;
        both normalised by ``targets.num_pos`` (averaged over ranks, >= 1); times ``weight``
        (lambda_1, ``model.co_detr.lambda_1`` in recipes).

        Args:
            outputs: decoder outputs of the group, (L, B, P, C) / (L, B, P, 4).
            targets: the group's fixed targets (boxes normalised cxcywh, background label = C).
            suffix: appended to every name, e.g. ``"_aux0"`` -> ``loss_cls_aux0``, ``d0.loss_cls_aux0``
                (a missing leading underscore is added: ``"aux0"`` gives the same names).
            image_sizes: (B, 2) valid (h, w) the boxes are normalised by; the GIoU is then computed in
                pixels as in the official code. ``None`` computes it on normalised boxes (same value up
                to rounding: GIoU is invariant to per-axis scaling).
        """
        if suffix and not suffix.startswith("_"):
            suffix = "_" + suffix
        return self.fixed_target_loss(outputs, targets, suffix=suffix, image_sizes=image_sizes,
                                      weight=weight)

    def fixed_target_loss(self, outputs: DecoderOutputs, targets: AuxTargets, *, prefix: str = "",
                          suffix: str = "", image_sizes: Tensor | None = None, weight: float = 1.0
                          ) -> dict[str, Tensor]:
        """Per-layer losses of a query group whose targets are fixed (no matching).

        Shared by Co-DETR's customized positive queries (:meth:`aux_group_loss`) and denoising groups
        (``prefix="dn_"`` gives the official ``dn_loss_*`` / ``d{i}.dn_loss_*``: positives carry the GT,
        negatives the background label, ``num_pos`` = #GT x #groups). Names:
        ``[d{i}.]{prefix}loss_{cls,bbox,iou}{suffix}``; values already weighted (x ``weight``).
        """
        logits_all, boxes_all = outputs.logits, outputs.boxes
        num_layers, b, p, c = logits_all.shape
        device = logits_all.device
        losses: dict[str, Tensor] = {}
        # every rank takes part in the normaliser's all-reduce, also a rank whose group is empty (e.g. DINO's DN
        # queries on a rank whose images have no box): skipping it there would leave the others waiting forever
        cls_norm, box_norm = self._normalisers(float(targets.num_pos), device)
        if p == 0:  # official fallback: 0 * mean(scores) (keeps the graph)
            zero = logits_all.float().sum() * 0.0 + boxes_all.float().sum() * 0.0
            for layer in range(num_layers):
                for term in _TERMS:
                    losses[loss_name(term, layer, num_layers, prefix, suffix)] = zero
            return losses
        labels = targets.labels.to(device).long()
        label_w = targets.label_weights.to(device).float()
        box_w = targets.box_weights.to(device).float()
        if box_w.ndim == 3:  # official (B, P, 4) layout
            box_w = box_w.mean(-1)
        tgt = targets.boxes.to(device).float()
        pos_mask = (labels >= 0) & (labels < c)
        scale = _size_scale(image_sizes.to(device)).unsqueeze(1) if image_sizes is not None else None
        tgt_xyxy = cxcywh_to_xyxy(tgt)
        if scale is not None:
            tgt_xyxy = tgt_xyxy * scale
        for layer in range(num_layers):
            logits, boxes = logits_all[layer].float(), boxes_all[layer].float()
            cls = (self._classification(logits, labels, boxes, tgt, pos_mask) * label_w).sum() / cls_norm
            l1 = (l1_loss(boxes, tgt).sum(-1) * box_w).sum() / box_norm
            pred_xyxy = cxcywh_to_xyxy(boxes)
            if scale is not None:
                pred_xyxy = pred_xyxy * scale
            giou = (giou_loss(pred_xyxy.reshape(-1, 4), tgt_xyxy.reshape(-1, 4)).view(b, p) * box_w).sum() / box_norm
            for term, v in (("cls", self.cfg.cls_weight * cls), ("bbox", self.cfg.bbox_weight * l1),
                            ("iou", self.cfg.giou_weight * giou)):
                losses[loss_name(term, layer, num_layers, prefix, suffix)] = weight * v
        return losses
