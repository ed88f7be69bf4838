"""Element-wise loss terms of the DETR-family set criterion (no reduction, no normalisation here).

Every function returns **un-reduced** values; :mod:`codetr.heads.criterion` applies weights and the
official normalisers (sum / number of positives). Conventions:

* classification logits are sigmoid-style, shape (N, C); labels are (N,) int64 with background
  ``== C`` (one-hot over ``C + 1`` columns, last column dropped, so background rows are all-zero);
* boxes are (N, 4) and aligned pairwise (row i of ``pred`` against row i of ``target``).

Two terms exist in two numerically distinct forms, under explicit names: the torchvision-based
``sigmoid_focal_loss`` / ``giou_loss`` (DETR criterion) and ``sigmoid_focal_loss_mmdet`` /
``giou_loss_mmdet``, which keep MMDetection's exact operation order for the aux heads' parity.

Official counterparts (for parity, paraphrased, not copied): MMDetection ``FocalLoss`` (sigmoid path),
``QualityFocalLoss`` (``use_sigmoid=True``), ``L1Loss``, ``GIoULoss`` and ``bbox_overlaps(...,
is_aligned=True)``; Deformable-DETR ``sigmoid_focal_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

__all__ = [
    "one_hot_without_background",
    "sigmoid_focal_loss",
    "quality_focal_loss",
    "l1_loss",
    "giou_loss",
    "sigmoid_focal_loss_mmdet",
    "giou_loss_mmdet",
    "aligned_iou",
]


def one_hot_without_background(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N,) labels in ``[0, num_classes]`` (``num_classes`` = background) -> (N, num_classes) one-hot.

    Background rows are all zeros (the sigmoid/focal convention).
    """
    onehot = F.one_hot(labels.long(), num_classes + 1)[..., :num_classes]
    return onehot.to(dtype)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss (Lin et al.), same shape as ``logits``; no reduction.

    ``targets`` is a float tensor of the logits' shape (one-hot, background rows all zero), or an int64
    label tensor with one fewer dimension (background = ``logits.shape[-1]``), which is one-hot encoded here.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``; ``alpha < 0`` disables the alpha weighting (torchvision
    convention). Normalisation (sum / number of positives, as in MMDetection's ``DETRHead`` and
    Deformable-DETR's ``loss_labels``) is the caller's job.
    """
    if not targets.is_floating_point():
        targets = one_hot_without_background(targets, logits.shape[-1], logits.dtype)
    return _tv_sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none")


def quality_focal_loss(logits: Tensor, labels: Tensor, scores: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss (GFL, Li et al. 2020) per sample, summed over classes; no reduction.

    Args:
        logits: (..., C) raw class logits.
        labels: (...) int64 class per sample, background = ``C`` (or any value outside ``[0, C)``).
        scores: (...) float quality target (IoU of the matched box) of the positive class; ignored for
            background samples.
        beta: modulating exponent.

    Returns:
        (...) loss per sample: every class gets ``BCE(logit, 0) * sigmoid(logit)^beta`` except the labelled
        class of a positive sample, which gets ``BCE(logit, score) * |score - sigmoid(logit)|^beta``.
        The modulating factors are **not** detached (as in MMDetection's ``quality_focal_loss``).
    """
    num_classes = logits.shape[-1]
    prob = logits.sigmoid()
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    pos_mask = (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(pos_mask, labels, num_classes).long(), num_classes + 1)[..., :num_classes].bool()
    safe_scores = torch.where(pos_mask, scores.to(logits.dtype), torch.zeros((), dtype=logits.dtype, device=logits.device))
    score_full = safe_scores.unsqueeze(-1).expand_as(logits)
    pos = F.binary_cross_entropy_with_logits(logits, score_full, reduction="none") * (score_full - prob).abs().pow(beta)
    return torch.where(onehot, pos, neg).sum(-1)


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Element-wise ``|pred - target|``."""
    return (pred - target).abs()


def giou_loss(pred_xyxy: Tensor, target_xyxy: Tensor, eps: float = 1e-7) -> Tensor:
    """(N,) ``1 - GIoU`` of aligned xyxy box pairs (any units; GIoU is invariant to per-axis scaling)."""
    if pred_xyxy.numel() == 0:
        return pred_xyxy.new_zeros(pred_xyxy.shape[:-1])
    return generalized_box_iou_loss(pred_xyxy, target_xyxy, reduction="none", eps=eps)


def aligned_iou(a_xyxy: Tensor, b_xyxy: Tensor, eps: float = 1e-6) -> Tensor:
    """(N,) IoU of aligned xyxy pairs, union clamped to ``>= eps`` (MMDetection ``bbox_overlaps`` semantics)."""
    lt = torch.maximum(a_xyxy[..., :2], b_xyxy[..., :2])
    rb = torch.minimum(a_xyxy[..., 2:], b_xyxy[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a_xyxy[..., 2] - a_xyxy[..., 0]) * (a_xyxy[..., 3] - a_xyxy[..., 1])
    area_b = (b_xyxy[..., 2] - b_xyxy[..., 0]) * (b_xyxy[..., 3] - b_xyxy[..., 1])
    union = (area_a + area_b - inter).clamp(min=eps)
    return inter / union


def sigmoid_focal_loss_mmdet(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """(N, C) element-wise sigmoid focal loss in MMDetection ``py_sigmoid_focal_loss`` operation order.

    ``labels`` (N,) int64, background = any value outside ``[0, C)``. Used by the ATSS head, whose parity
    with the official head depends on this order (``sigmoid_focal_loss`` differs in the last bits).
    """
    c = logits.shape[-1]
    target = torch.zeros_like(logits)
    pos = (labels >= 0) & (labels < c)
    target[pos, labels[pos]] = 1.0  # one-hot without the background column (no (N, C + 1) int64 temporary)
    p = logits.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * focal_weight


def giou_loss_mmdet(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """(N,) ``1 - GIoU`` of aligned xyxy pairs, MMDetection ``bbox_overlaps(mode='giou', is_aligned=True)``.

    ``eps`` clamps the union and the enclosing area from below (mmdet ``GIoULoss``: 1e-6). Used by the aux
    heads (ATSS, R-CNN) for parity with the official ones.
    """
    area1 = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area2 = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    e = overlap.new_tensor([eps])
    union = torch.maximum(area1 + area2 - overlap, e)
    ious = overlap / union
    enc_wh = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0)
    enc_area = torch.maximum(enc_wh[:, 0] * enc_wh[:, 1], e)
    return 1 - (ious - (enc_area - union) / enc_area)
