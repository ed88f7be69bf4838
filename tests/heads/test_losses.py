"""Element-wise loss helpers against direct formulas."""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_iou, generalized_box_iou

from codetr.heads.losses import (
    aligned_iou,
    giou_loss,
    l1_loss,
    one_hot_without_background,
    quality_focal_loss,
    sigmoid_focal_loss,
)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(x: float, t: float) -> float:
    return -(t * math.log(_sig(x)) + (1 - t) * math.log(1 - _sig(x)))


def test_one_hot_background_is_all_zero():
    oh = one_hot_without_background(torch.tensor([0, 2, 3]), 3)
    assert oh.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_sigmoid_focal_loss_direct_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g) * 3
    labels = torch.tensor([0, 3, 4, 1, 4])  # 4 = background
    alpha, gamma = 0.25, 2.0
    got = sigmoid_focal_loss(logits, labels, alpha, gamma)
    assert got.shape == logits.shape
    for i in range(5):
        for c in range(4):
            x, t = float(logits[i, c]), float(labels[i] == c)
            p = _sig(x)
            pt = p if t else 1 - p
            at = alpha if t else 1 - alpha
            want = -at * (1 - pt) ** gamma * math.log(pt)
            assert abs(float(got[i, c]) - want) < 1e-5 * max(1.0, want)
    # label tensor and explicit one-hot give the same values
    torch.testing.assert_close(got, sigmoid_focal_loss(logits, one_hot_without_background(labels, 4), alpha, gamma))


def test_quality_focal_loss_direct_formula_and_grad():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 5, generator=g) * 2).requires_grad_()
    labels = torch.tensor([2, 5, 0, 4, 5, 1])  # 5 = background
    scores = torch.tensor([0.7, float("nan"), 0.0, 0.95, 0.3, 1.0])  # a bg score is ignored, even NaN
    beta = 2.0
    got = quality_focal_loss(logits, labels, scores, beta)
    assert got.shape == (6,)
    for i in range(6):
        want = 0.0
        for c in range(5):
            x = float(logits.detach()[i, c])
            p = _sig(x)
            if int(labels[i]) == c:
                s = float(scores[i])
                want += _bce(x, s) * abs(s - p) ** beta
            else:
                want += _bce(x, 0.0) * p ** beta
        assert abs(float(got.detach()[i]) - want) < 1e-5 * max(1.0, want)
    got.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_l1_and_iou_helpers():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(7, 2, generator=g) * 50
    a = torch.cat([a, a + torch.rand(7, 2, generator=g) * 40 + 1], -1)
    b = torch.rand(7, 2, generator=g) * 50
    b = torch.cat([b, b + torch.rand(7, 2, generator=g) * 40 + 1], -1)
    torch.testing.assert_close(l1_loss(a, b), (a - b).abs())
    torch.testing.assert_close(aligned_iou(a, b), box_iou(a, b).diagonal())
    torch.testing.assert_close(giou_loss(a, b), 1 - generalized_box_iou(a, b).diagonal())
    assert giou_loss(a[:0], b[:0]).shape == (0,)
    # identical boxes: loss 0; disjoint far boxes: loss approaches 2
    assert float(giou_loss(a, a).abs().max()) < 1e-6
