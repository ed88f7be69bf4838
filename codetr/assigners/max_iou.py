"""Max-IoU one-to-many assigner (Faster R-CNN RPN / RoI head; MMDetection ``MaxIoUAssigner`` semantics).

For A candidate boxes (anchors or proposals) and N ground-truth boxes of one image, with
``overlaps[n, a] = IoU(gt_n, box_a)``::

    1. every box starts "ignored"                                   (gt_index = -2)
    2. max_iou[a] = max_n overlaps[n, a]; boxes with
       0 <= max_iou < neg_iou_thr (or lo <= max_iou < hi)  -> negative  (gt_index = -1)
    3. max_iou >= pos_iou_thr                                -> positive, gt = argmax_n
    4. match_low_quality: for n = 0 .. N-1 **in GT order** (a later GT overwrites an earlier one), if
       gt_max[n] = max_a overlaps[n, a] >= min_pos_iou, the box(es) reaching gt_max[n] get gt n
       (all of them when gt_max_assign_all, else the first argmax only).

Ignore regions (``ignore_iof_thr > 0`` and ignore boxes given, e.g. crowd annotations): boxes whose
IoF (intersection over the *candidate's* area) with any ignore box exceeds the threshold get all their
overlaps set to -1 and so end up "ignored" (not negative, not positive) unless a low-quality match
picks them.

Index conventions (codetr :class:`AssignResult`): ``gt_index`` is 0-based, -1 = background (negative),
-2 = ignored; ``labels`` uses background = ``num_classes`` for negatives *and* ignored boxes;
``max_iou`` is the best IoU over the GTs (0 when there is no GT). MMDetection's ``gt_inds`` is
``gt_index + 1`` with ``-2 -> -1`` (see :func:`to_mmdet_gt_inds`).

IoU arithmetic follows MMDetection's ``bbox_overlaps`` operation by operation (areas as ``w * h``,
union clamped to ``>= 1e-6``) so that thresholds and exact-equality ties (step 4) decide the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from codetr.core.interfaces import AssignResult, OneToManyAssigner
from codetr.core.registry import Component, ComponentConfig

__all__ = [
    "MaxIoUAssignerConfig",
    "MaxIoUAssigner",
    "bbox_overlaps",
    "to_mmdet_gt_inds",
    "build",
    "COMPONENT",
]

_CHUNK_ELEMENTS = 1 << 24  # rows x cols per IoU block (bounds memory for 500k anchors x many GTs)


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, mode: Literal["iou", "iof"] = "iou", eps: float = 1e-6) -> Tensor:
    """(M, 4) x (K, 4) xyxy -> (M, K) IoU (or IoF = intersection / area of ``boxes1``).

    Same operation order as MMDetection ``bbox_overlaps(..., is_aligned=False)``; large inputs are
    processed in row blocks (bit-identical, bounded memory). Extra columns (e.g. a score) are ignored.
    """
    boxes1 = boxes1[..., :4]
    boxes2 = boxes2[..., :4]
    m, k = boxes1.shape[0], boxes2.shape[0]
    if m == 0 or k == 0:
        return boxes1.new_zeros((m, k))
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    eps_t = boxes1.new_tensor([eps])
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    out = []
    for s in range(0, m, rows):
        b1 = boxes1[s:s + rows]
        lt = torch.max(b1[:, None, :2], boxes2[None, :, :2])
        rb = torch.min(b1[:, None, 2:], boxes2[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        overlap = wh[..., 0] * wh[..., 1]
        if mode == "iou":
            union = area1[s:s + rows, None] + area2[None, :] - overlap
        else:
            union = area1[s:s + rows, None].expand_as(overlap)
        out.append(overlap / torch.max(union, eps_t))
    return out[0] if len(out) == 1 else torch.cat(out, 0)


def to_mmdet_gt_inds(result: AssignResult) -> Tensor:
    """codetr ``gt_index`` -> MMDetection ``gt_inds`` (1-based positives, 0 negative, -1 ignored)."""
    g = result.gt_index
    return torch.where(g >= 0, g + 1, torch.where(g == -1, torch.zeros_like(g), torch.full_like(g, -1)))


class MaxIoUAssignerConfig(ComponentConfig):
    """Options of :class:`MaxIoUAssigner` (defaults: the Faster R-CNN RPN assigner 0.7 / 0.3 / 0.3)."""

    type: Literal["max_iou"] = "max_iou"
    pos_iou_thr: float = Field(0.7, ge=0, le=1, description="IoU >= this -> positive")
    neg_iou_thr: float | tuple[float, float] = Field(
        0.3, description="IoU in [0, thr) -> negative; a pair (lo, hi) means [lo, hi)")
    min_pos_iou: float = Field(0.3, ge=0, le=1, description="minimum IoU of a low-quality match")
    match_low_quality: bool = Field(True, description="give every GT its best box(es) (step 4)")
    gt_max_assign_all: bool = Field(True, description="low-quality match assigns all boxes tied at the max")
    ignore_iof_thr: float = Field(-1.0, description="> 0: ignore boxes with IoF > thr against ignore regions")
    ignore_wrt_candidates: bool = Field(True, description="IoF relative to the candidate's area (mmdet default)")

    @field_validator("neg_iou_thr")
    @classmethod
    def _check_neg(cls, v: float | tuple[float, float]) -> float | tuple[float, float]:
        if isinstance(v, tuple):
            lo, hi = v
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"neg_iou_thr range must satisfy 0 <= lo <= hi <= 1, got {v}")
        elif not 0 <= v <= 1:
            raise ValueError(f"neg_iou_thr must be in [0, 1], got {v}")
        return v


class MaxIoUAssigner(OneToManyAssigner):
    """Max-IoU assignment; see the module docstring. Pure function of tensors (no RNG)."""

    def __init__(self, cfg: MaxIoUAssignerConfig | None = None):
        self.cfg = cfg if cfg is not None else MaxIoUAssignerConfig()

    def assign(self, anchors_xyxy: Tensor, num_per_level: list[int] | None, gt_boxes_xyxy: Tensor,
               gt_labels: Tensor | None, num_classes: int, pred_scores: Tensor | None = None,
               pred_boxes_xyxy: Tensor | None = None, ignore_boxes_xyxy: Tensor | None = None) -> AssignResult:
        """Assign A boxes to N GTs; ``num_per_level`` and the prediction arguments are unused.

        ``gt_labels`` may be None (class-agnostic use, e.g. the RPN): positives then get label 0.
        """
        cfg = self.cfg
        overlaps = bbox_overlaps(gt_boxes_xyxy, anchors_xyxy)  # (N, A)
        if (cfg.ignore_iof_thr > 0 and ignore_boxes_xyxy is not None and ignore_boxes_xyxy.numel() > 0
                and anchors_xyxy.numel() > 0 and overlaps.numel() > 0):
            if cfg.ignore_wrt_candidates:
                ign = bbox_overlaps(anchors_xyxy, ignore_boxes_xyxy, mode="iof").max(dim=1).values
            else:
                ign = bbox_overlaps(ignore_boxes_xyxy, anchors_xyxy, mode="iof").max(dim=0).values
            overlaps[:, ign > cfg.ignore_iof_thr] = -1
        return self.assign_wrt_overlaps(overlaps, gt_labels, num_classes)

    def assign_wrt_overlaps(self, overlaps: Tensor, gt_labels: Tensor | None, num_classes: int) -> AssignResult:
        """Assignment from a precomputed (N, A) overlap matrix (MMDetection ``assign_wrt_overlaps``)."""
        cfg = self.cfg
        num_gts, num_boxes = overlaps.shape
        device = overlaps.device
        # MMDetection encoding internally: -1 ignored, 0 negative, k >= 1 positive (GT k-1).
        gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
        if num_gts == 0 or num_boxes == 0:
            max_iou = overlaps.new_zeros((num_boxes,))
            if num_gts == 0:
                gt_inds[:] = 0
            labels = torch.full((num_boxes,), num_classes, dtype=torch.long, device=device)
            return AssignResult(gt_index=_from_mmdet(gt_inds), max_iou=max_iou, labels=labels)

        max_iou, argmax = overlaps.max(dim=0)
        gt_max, gt_argmax = overlaps.max(dim=1)

        thr = cfg.neg_iou_thr
        if isinstance(thr, tuple):
            gt_inds[(max_iou >= thr[0]) & (max_iou < thr[1])] = 0
        else:
            gt_inds[(max_iou >= 0) & (max_iou < thr)] = 0

        pos = max_iou >= cfg.pos_iou_thr
        gt_inds[pos] = argmax[pos] + 1

        if cfg.match_low_quality:
            # Sequential over GTs on purpose: a later GT overwrites an earlier one on shared boxes.
            for i in range(num_gts):
                if gt_max[i] >= cfg.min_pos_iou:
                    if cfg.gt_max_assign_all:
                        gt_inds[overlaps[i, :] == gt_max[i]] = i + 1
                    else:
                        gt_inds[gt_argmax[i]] = i + 1

        labels = torch.full((num_boxes,), num_classes, dtype=torch.long, device=device)
        pos_mask = gt_inds > 0
        if gt_labels is None:
            labels[pos_mask] = 0
        else:
            labels[pos_mask] = gt_labels.to(device=device, dtype=torch.long)[gt_inds[pos_mask] - 1]
        return AssignResult(gt_index=_from_mmdet(gt_inds), max_iou=max_iou, labels=labels)


def _from_mmdet(gt_inds: Tensor) -> Tensor:
    return torch.where(gt_inds > 0, gt_inds - 1, torch.where(gt_inds == 0, torch.full_like(gt_inds, -1),
                                                              torch.full_like(gt_inds, -2)))


def build(cfg: MaxIoUAssignerConfig) -> MaxIoUAssigner:
    return MaxIoUAssigner(cfg)


COMPONENT = Component(
    config=MaxIoUAssignerConfig,
    build=build,
    summary="Max-IoU one-to-many assignment (Faster R-CNN RPN/RoI; MMDetection MaxIoUAssigner semantics)",
)
