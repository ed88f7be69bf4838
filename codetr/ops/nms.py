"""Class-aware NMS with MMCV's exact conventions (``mmcv.ops.batched_nms`` / mmdet ``multiclass_nms``).

``torchvision.ops.nms`` is bit-identical to MMCV's compiled ``nms`` (same IoU formula, same greedy
order), but ``torchvision.ops.batched_nms`` is not a drop-in replacement for MMCV's ``batched_nms``:
MMCV always offsets the boxes of group ``g`` by ``g * (max_coordinate + 1)`` (the shifted coordinates
round differently from the unshifted ones), and above ``split_thr`` boxes it runs one NMS per group on
the *shifted* boxes and re-sorts the survivors by score, while torchvision switches to an unshifted
per-group loop above 4000 CPU boxes. The functions here reproduce MMCV.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

__all__ = ["batched_nms", "multiclass_nms", "offset_boxes_by_class"]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                class_agnostic: bool = False, split_thr: int = 10000) -> tuple[Tensor, Tensor]:
    """NMS inside each group ``idxs`` (MMCV ``batched_nms``).

    Args:
        boxes: (N, 4) xyxy; scores: (N,); idxs: (N,) int group ids (class or level).

    Returns:
        ``(keep, kept_scores)``: indices into the inputs in decreasing score order, and their scores.
    """
    if boxes.numel() == 0:
        return boxes.new_zeros(0, dtype=torch.long), scores.new_zeros(0)
    boxes_for_nms = offset_boxes_by_class(boxes, idxs, class_agnostic)
    if boxes_for_nms.shape[0] < split_thr:
        keep = nms(boxes_for_nms, scores, iou_threshold)
        return keep, scores[keep]
    total_mask = torch.zeros_like(scores, dtype=torch.bool)
    for g in torch.unique(idxs):
        mask = (idxs == g).nonzero(as_tuple=False).view(-1)
        k = nms(boxes_for_nms[mask], scores[mask], iou_threshold)
        total_mask[mask[k]] = True
    keep = total_mask.nonzero(as_tuple=False).view(-1)
    kept_scores, order = scores[keep].sort(descending=True)
    return keep[order], kept_scores


def multiclass_nms(boxes: Tensor, scores: Tensor, score_thr: float, iou_threshold: float,
                   max_num: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class NMS of R-CNN outputs (mmdet ``multiclass_nms``).

    Args:
        boxes: (N, 4 * C) class-specific or (N, 4) class-agnostic xyxy boxes.
        scores: (N, C + 1) softmax scores, last column = background (dropped).
        score_thr: keep (box, class) pairs with score > score_thr.
        max_num: keep at most this many detections (<= 0: all).

    Returns:
        ``(boxes (K, 4), scores (K,), labels (K,))`` in decreasing score order.
    """
    n, num_classes = scores.shape[0], scores.shape[1] - 1
    if boxes.shape[1] > 4:
        b = boxes.view(n, -1, 4)
    else:
        b = boxes[:, None].expand(n, num_classes, 4)
    s = scores[:, :-1]
    labels = torch.arange(num_classes, dtype=torch.long, device=scores.device).view(1, -1).expand_as(s)
    b = b.reshape(-1, 4)
    s = s.reshape(-1)
    labels = labels.reshape(-1)
    inds = (s > score_thr).nonzero(as_tuple=False).squeeze(1)
    b, s, labels = b[inds], s[inds], labels[inds]
    if b.numel() == 0:
        return b.new_zeros(0, 4), s.new_zeros(0), labels.new_zeros(0)
    keep, kept_scores = batched_nms(b, s, labels, iou_threshold)
    if max_num > 0:
        keep, kept_scores = keep[:max_num], kept_scores[:max_num]
    return b[keep], kept_scores, labels[keep]


def offset_boxes_by_class(boxes: Tensor, idxs: Tensor, class_agnostic: bool = False) -> Tensor:
    """mmcv's trick for per-class NMS in one call: shift each class's boxes by ``idx * (max + 1)`` so boxes
    of different classes never overlap (same arithmetic as mmcv, for bit-identical results)."""
    if class_agnostic:
        return boxes
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return boxes + offsets[:, None]
