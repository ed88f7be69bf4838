"""ATSS: Adaptive Training Sample Selection (Zhang et al., CVPR 2020) as a one-to-many assigner.

Algorithm (MMDetection ``ATSSAssigner`` semantics, paraphrased, not copied), for one image with A
anchors in level-major order and N ground-truth boxes:

1. ``iou`` (A, N): IoU of every anchor with every GT (union clamped to >= 1e-6).
2. ``dist`` (A, N): Euclidean distance between anchor centres and GT centres.
3. Per level, the ``topk`` anchors closest to each GT centre (``min(topk, anchors of the level)``;
   ``torch.topk(largest=False)``) are the GT's candidates.
4. Per GT, threshold = mean + std of the candidates' IoUs (``Tensor.std``: the unbiased estimator,
   as in the official code).
5. A candidate is positive for a GT when its IoU >= the threshold **and** its centre lies strictly
   inside the GT with a margin: ``min(cx - x1, cy - y1, x2 - cx, y2 - cy) > 0.01``.
6. An anchor positive for several GTs goes to the one with the highest IoU (first GT index on ties).

Differences from the official return value, by our :class:`AssignResult` contract:
``gt_index`` is 0-based with -1 = background (official: 1-based, 0 = negative), ``labels`` use
``num_classes`` for background (official: -1), and ``max_iou`` of a negative anchor is its best IoU
over all GTs (official ``max_overlaps`` holds -1e8 there; it equals ours on positives). There is no
ignore region (the official ``ignore_iof_thr`` is -1 in every Co-DETR config), so ``-2`` is never
returned and ``ignore_boxes_xyxy`` must be ``None`` or empty.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from codetr.core.interfaces import AssignResult, OneToManyAssigner
from codetr.core.registry import Component, ComponentConfig

__all__ = ["ATSSAssignerConfig", "ATSSAssigner", "pairwise_iou", "build_atss_assigner", "COMPONENT"]

_NEG_INF = -100000000.0


class ATSSAssignerConfig(ComponentConfig):
    """ATSS assigner options.

    Attributes:
        topk: candidates per level and GT (closest anchor centres).
    """

    type: Literal["atss"] = "atss"
    topk: int = Field(9, ge=1)


def pairwise_iou(a_xyxy: Tensor, b_xyxy: Tensor, eps: float = 1e-6) -> Tensor:
    """(A, N) IoU of every box of ``a`` with every box of ``b`` (MMDetection ``bbox_overlaps``: union >= eps)."""
    area_a = (a_xyxy[:, 2] - a_xyxy[:, 0]) * (a_xyxy[:, 3] - a_xyxy[:, 1])
    area_b = (b_xyxy[:, 2] - b_xyxy[:, 0]) * (b_xyxy[:, 3] - b_xyxy[:, 1])
    lt = torch.maximum(a_xyxy[:, None, :2], b_xyxy[None, :, :2])
    rb = torch.minimum(a_xyxy[:, None, 2:], b_xyxy[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    union = torch.maximum(union, union.new_tensor([eps]))
    return inter / union


class ATSSAssigner(OneToManyAssigner):
    """Static (prediction-free) ATSS assignment; see the module docstring."""

    def __init__(self, cfg: ATSSAssignerConfig | None = None):
        self.cfg = cfg if cfg is not None else ATSSAssignerConfig()
        self.topk = int(self.cfg.topk)

    def __repr__(self) -> str:
        return f"ATSSAssigner(topk={self.topk})"

    @torch.no_grad()
    def assign(self, anchors_xyxy: Tensor, num_per_level: list[int], gt_boxes_xyxy: Tensor,
               gt_labels: Tensor, num_classes: int, pred_scores: Tensor | None = None,
               pred_boxes_xyxy: Tensor | None = None, ignore_boxes_xyxy: Tensor | None = None
               ) -> AssignResult:
        if ignore_boxes_xyxy is not None and ignore_boxes_xyxy.numel() > 0:
            raise NotImplementedError("ATSSAssigner has no ignore-region handling (official ignore_iof_thr=-1); "
                                      "drop crowd/ignored boxes before assigning")
        anchors = anchors_xyxy[:, :4]
        num_anchors, num_gt = int(anchors.shape[0]), int(gt_boxes_xyxy.shape[0])
        if sum(int(n) for n in num_per_level) != num_anchors:
            raise ValueError(f"num_per_level sums to {sum(num_per_level)} but there are {num_anchors} anchors")
        device = anchors.device
        gt_index = torch.full((num_anchors,), -1, dtype=torch.int64, device=device)
        labels = torch.full((num_anchors,), num_classes, dtype=torch.int64, device=device)
        if num_gt == 0 or num_anchors == 0:
            return AssignResult(gt_index, anchors.new_zeros((num_anchors,)), labels)

        gt = gt_boxes_xyxy.to(anchors.dtype)
        overlaps = pairwise_iou(anchors, gt)  # (A, N)

        gt_cx = (gt[:, 0] + gt[:, 2]) / 2.0
        gt_cy = (gt[:, 1] + gt[:, 3]) / 2.0
        gt_points = torch.stack((gt_cx, gt_cy), dim=1)
        a_cx = (anchors[:, 0] + anchors[:, 2]) / 2.0
        a_cy = (anchors[:, 1] + anchors[:, 3]) / 2.0
        a_points = torch.stack((a_cx, a_cy), dim=1)
        distances = (a_points[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt()  # (A, N)

        # candidates: per level the topk closest anchors of each GT
        cands, start = [], 0
        for n in num_per_level:
            n = int(n)
            if n == 0:
                continue
            k = min(self.topk, n)
            _, idx = distances[start:start + n].topk(k, dim=0, largest=False)
            cands.append(idx + start)
            start += n
        cand_idx = torch.cat(cands, dim=0)  # (K_total, N)
        gt_ar = torch.arange(num_gt, device=device)
        cand_iou = overlaps[cand_idx, gt_ar]  # (K_total, N)
        thr = cand_iou.mean(0) + cand_iou.std(0)
        is_pos = cand_iou >= thr[None, :]

        # candidate centre strictly inside its GT (official margin 0.01)
        ccx = a_cx[cand_idx]
        ccy = a_cy[cand_idx]
        l_ = ccx - gt[:, 0]
        t_ = ccy - gt[:, 1]
        r_ = gt[:, 2] - ccx
        b_ = gt[:, 3] - ccy
        is_in = torch.stack([l_, t_, r_, b_], dim=1).min(dim=1)[0] > 0.01
        is_pos = is_pos & is_in

        # each anchor: the positive GT with the highest IoU
        masked = torch.full_like(overlaps, _NEG_INF)
        pos_rows = cand_idx[is_pos]
        pos_cols = gt_ar.expand_as(cand_idx)[is_pos]
        masked[pos_rows, pos_cols] = overlaps[pos_rows, pos_cols]
        best, arg = masked.max(dim=1)
        pos = best != _NEG_INF
        gt_index[pos] = arg[pos]
        labels[pos] = gt_labels.to(device=device, dtype=torch.int64)[arg[pos]]
        max_iou = torch.where(pos, best, overlaps.max(dim=1)[0])
        return AssignResult(gt_index, max_iou, labels)


def build_atss_assigner(cfg: ATSSAssignerConfig) -> ATSSAssigner:
    return ATSSAssigner(cfg)


COMPONENT = Component(config=ATSSAssignerConfig, build=build_atss_assigner,
                      summary="ATSS one-to-many assigner (per-level top-k by centre distance, IoU >= mean + std)")
