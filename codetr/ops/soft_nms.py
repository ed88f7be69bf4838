"""Soft-NMS with MMCV's exact semantics (``mmcv.ops.soft_nms`` / ``batched_nms(..., type='soft_nms')``), pure torch.

MMCV's CPU kernel (the only one it has) works in place on the candidate arrays:

* step ``i`` swaps the highest remaining score (first one on ties, in the *current* array order) into slot
  ``i`` and emits it with its current (already decayed) score;
* every later candidate ``p`` has its score multiplied by a weight from its IoU ``o`` with the emitted box:
  ``linear``: ``1 - o`` if ``o >= iou_threshold`` else 1; ``gaussian``: ``exp(-o^2 / sigma)``; ``naive``
  (hard NMS): 0 if ``o >= iou_threshold`` else 1;
* a candidate whose score falls below ``min_score`` is removed by moving the **last** candidate into its slot
  (which changes the order, hence the tie-breaking of later steps; reproduced here).

IoU uses ``(x2 - x1 + offset) * (y2 - y1 + offset)`` areas, float32, same operation order. Outputs are in
selection order. The per-step update is vectorised; the loop over steps is sequential (O(N^2) work), fine
for the few hundred DETR detections it is used on.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from codetr.ops.nms import offset_boxes_by_class

__all__ = ["soft_nms", "batched_soft_nms"]

_METHODS = ("naive", "linear", "gaussian")


def soft_nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5, min_score: float = 1e-3,
             method: Literal["naive", "linear", "gaussian"] = "linear", offset: int = 0) -> tuple[Tensor, Tensor]:
    """Soft-NMS of (N, 4) xyxy ``boxes`` with (N,) ``scores``.

    Returns:
        ``(dets (K, 5), keep (K,))``: the kept boxes with their decayed scores in selection order, and their
        indices into the inputs (MMCV ``soft_nms`` return values).
    """
    if method not in _METHODS:
        raise ValueError(f"soft_nms method must be one of {_METHODS}, got {method!r}")
    if offset not in (0, 1):
        raise ValueError(f"offset must be 0 or 1, got {offset}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"boxes must be (N, 4) and scores (N,), got {tuple(boxes.shape)} / {tuple(scores.shape)}")
    device = boxes.device
    n = int(boxes.shape[0])
    if n == 0:
        return boxes.new_zeros(0, 5), torch.zeros(0, dtype=torch.long, device=device)
    # rows: x1, y1, x2, y2, score, area (float32, on the CPU like MMCV)
    b = boxes.detach().to("cpu", torch.float32)
    s = scores.detach().to("cpu", torch.float32)
    area = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    state = torch.cat([b, s[:, None], area[:, None]], 1).contiguous()
    inds = torch.arange(n, dtype=torch.long)
    dets = torch.empty(n, 5, dtype=torch.float32)
    thr = torch.tensor(iou_threshold, dtype=torch.float32)
    end = n
    i = 0
    while i < end:
        j = i + int(torch.argmax(state[i:end, 4]))
        if j != i:
            state[[i, j]] = state[[j, i]]
            inds[[i, j]] = inds[[j, i]]
        top = state[i]
        dets[i] = top[:5]
        if i + 1 < end:
            rest = state[i + 1:end]
            xx1 = torch.maximum(top[0], rest[:, 0])
            yy1 = torch.maximum(top[1], rest[:, 1])
            xx2 = torch.minimum(top[2], rest[:, 2])
            yy2 = torch.minimum(top[3], rest[:, 3])
            w = (xx2 - xx1 + offset).clamp(min=0.0)
            h = (yy2 - yy1 + offset).clamp(min=0.0)
            inter = w * h
            ovr = inter / (top[5] + rest[:, 5] - inter)
            if method == "linear":
                weight = torch.where(ovr >= thr, 1 - ovr, torch.ones_like(ovr))
            elif method == "naive":
                weight = torch.where(ovr >= thr, torch.zeros_like(ovr), torch.ones_like(ovr))
            else:
                weight = torch.exp(-(ovr * ovr) / sigma)
            rest[:, 4] *= weight
            drop = rest[:, 4] < min_score
            if bool(drop.any()):
                order = _compact(drop.tolist())
                sel = torch.tensor(order, dtype=torch.long) + (i + 1)
                keep_n = len(order)
                state[i + 1:i + 1 + keep_n] = state[sel]
                inds[i + 1:i + 1 + keep_n] = inds[sel]
                end = i + 1 + keep_n
        i += 1
    return dets[:end].to(device), inds[:end].to(device)


def _compact(drop: list[bool]) -> list[int]:
    """Positions kept by MMCV's "replace a dropped candidate by the last one" loop, in their resulting order."""
    pos = list(range(len(drop)))
    flags = list(drop)
    lo, hi = 0, len(pos)
    while lo < hi:
        if flags[lo]:
            hi -= 1
            pos[lo], flags[lo] = pos[hi], flags[hi]
        else:
            lo += 1
    return pos[:hi]


def batched_soft_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
                     min_score: float = 1e-3, method: Literal["naive", "linear", "gaussian"] = "linear",
                     class_agnostic: bool = False, split_thr: int = 10000) -> tuple[Tensor, Tensor]:
    """Soft-NMS inside each group ``idxs`` (MMCV ``batched_nms`` with ``type='soft_nms'``).

    Below ``split_thr`` boxes all groups run in one soft-NMS on boxes offset by ``group * (max coordinate + 1)``
    (MMCV's trick, including its rounding) and the output keeps soft-NMS order; above it, one soft-NMS per
    group and the survivors sorted by decayed score.

    Returns:
        ``(keep (K,), scores (K,))``: indices into the inputs and their decayed scores.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), scores.new_zeros(0)
    boxes_for_nms = offset_boxes_by_class(boxes, idxs, class_agnostic)
    if boxes_for_nms.shape[0] < split_thr:
        dets, keep = soft_nms(boxes_for_nms, scores, iou_threshold, sigma, min_score, method)
        return keep, dets[:, -1].to(scores.dtype)
    total = torch.zeros_like(scores, dtype=torch.bool)
    after = scores.new_zeros(scores.shape)
    for g in torch.unique(idxs):
        mask = (idxs == g).nonzero(as_tuple=False).view(-1)
        dets, k = soft_nms(boxes_for_nms[mask], scores[mask], iou_threshold, sigma, min_score, method)
        total[mask[k]] = True
        after[mask[k]] = dets[:, -1].to(scores.dtype)
    keep = total.nonzero(as_tuple=False).view(-1)
    kept, order = after[keep].sort(descending=True)
    return keep[order], kept
