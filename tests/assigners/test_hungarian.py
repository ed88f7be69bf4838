"""HungarianAssigner on hand-built cases: identity, permutation invariance, optimality, edge cases."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from pydantic import ValidationError
from torchvision.ops import box_convert, generalized_box_iou

from codetr.assigners.hungarian import (
    COMPONENT,
    INVALID_COST,
    HungarianAssigner,
    HungarianAssignerConfig,
    build,
    focal_class_cost,
)
from codetr.core.interfaces import OneToOneAssigner
from codetr.core.registry import Registry

NUM_CLASSES = 7
SIZE = torch.tensor([480, 640])


def _random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 4) well-separated-ish normalised cxcywh boxes."""
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
    return torch.cat([c, wh], -1)


def _case(q: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(q, NUM_CLASSES, generator=g), _random_boxes(q, g),
            torch.randint(0, NUM_CLASSES, (n,), generator=g), _random_boxes(n, g))


def test_is_one_to_one_assigner_and_builds():
    a = build(HungarianAssignerConfig())
    assert isinstance(a, OneToOneAssigner) and a.kind == "one_to_one"
    assert COMPONENT.config is HungarianAssignerConfig and COMPONENT.build is build
    reg = Registry()
    reg.register("assigners", "hungarian", COMPONENT)
    cfg = reg.validate("assigners", {"type": "hungarian", "cost_class": 1.0, "cost_class_type": "softmax"})
    assert isinstance(reg.build("assigners", cfg), HungarianAssigner)


def test_config_defaults_and_strictness():
    c = HungarianAssignerConfig()
    assert (c.cost_class, c.cost_bbox, c.cost_giou, c.cost_class_type) == (2.0, 5.0, 2.0, "focal")
    assert (c.focal_alpha, c.focal_gamma, c.focal_eps) == (0.25, 2.0, 1e-8)
    with pytest.raises(ValidationError):
        HungarianAssignerConfig(cost_klass=1.0)
    with pytest.raises(ValidationError):
        HungarianAssignerConfig(cost_class=-1.0)


def test_perfect_predictions_match_themselves():
    g = torch.Generator().manual_seed(1)
    n, q = 5, 20
    gt_boxes = _random_boxes(n, g)
    gt_labels = torch.tensor([0, 3, 3, 6, 1])
    logits = torch.full((q, NUM_CLASSES), -6.0)
    boxes = _random_boxes(q, g)
    slots = torch.tensor([17, 2, 9, 11, 4])
    boxes[slots] = gt_boxes
    logits[slots, gt_labels] = 6.0
    m = HungarianAssigner().match(logits, boxes, gt_labels, gt_boxes, SIZE)
    assert m.pred_idx.dtype == torch.int64 and m.gt_idx.dtype == torch.int64
    got = dict(zip(m.gt_idx.tolist(), m.pred_idx.tolist()))
    assert got == {i: int(s) for i, s in enumerate(slots)}
    assert torch.all(m.pred_idx[1:] > m.pred_idx[:-1])  # sorted by prediction index


def test_permutation_invariance():
    logits, boxes, labels, gt = _case(30, 6, seed=3)
    a = HungarianAssigner()
    base = a.match(logits, boxes, labels, gt, SIZE)
    pairs = set(zip(base.pred_idx.tolist(), base.gt_idx.tolist()))
    perm_q = torch.randperm(30, generator=torch.Generator().manual_seed(4))
    perm_n = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    m = a.match(logits[perm_q], boxes[perm_q], labels[perm_n], gt[perm_n], SIZE)
    mapped = {(int(perm_q[p]), int(perm_n[g])) for p, g in zip(m.pred_idx.tolist(), m.gt_idx.tolist())}
    assert mapped == pairs


@pytest.mark.parametrize("q,n", [(5, 3), (4, 4), (3, 5)])
def test_optimal_against_brute_force(q, n):
    a = HungarianAssigner()
    for seed in range(5):
        logits, boxes, labels, gt = _case(q, n, seed)
        cost = a.cost_matrix(logits, boxes, labels, gt, SIZE)
        m = a.match(logits, boxes, labels, gt, SIZE)
        k = min(q, n)
        assert len(m.pred_idx) == k and len(set(m.pred_idx.tolist())) == k and len(set(m.gt_idx.tolist())) == k
        best = math.inf
        if q >= n:
            for perm in itertools.permutations(range(q), n):
                best = min(best, float(sum(cost[perm[j], j] for j in range(n))))
        else:
            for perm in itertools.permutations(range(n), q):
                best = min(best, float(sum(cost[i, perm[i]] for i in range(q))))
        assert float(cost[m.pred_idx, m.gt_idx].sum()) == pytest.approx(best, abs=1e-5)


def test_focal_cost_matches_direct_formula():
    logits, boxes, labels, gt = _case(6, 4, seed=7)
    alpha, gamma, eps = 0.25, 2.0, 1e-8
    got = focal_class_cost(logits, labels, alpha, gamma, eps)
    for i in range(6):
        for j in range(4):
            p = 1 / (1 + math.exp(-float(logits[i, labels[j]])))
            want = (alpha * (1 - p) ** gamma * -math.log(p + eps)
                    - (1 - alpha) * p ** gamma * -math.log(1 - p + eps))
            assert float(got[i, j]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_total_cost_is_weighted_sum_of_terms():
    logits, boxes, labels, gt = _case(8, 3, seed=8)
    cfg = HungarianAssignerConfig(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_eps=1e-12)
    cost = HungarianAssigner(cfg).cost_matrix(logits, boxes, labels, gt, SIZE)
    xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    want = (2.0 * focal_class_cost(logits, labels, eps=1e-12) + 5.0 * torch.cdist(boxes, gt, p=1)
            - 2.0 * generalized_box_iou(xyxy(boxes), xyxy(gt)))
    torch.testing.assert_close(cost, want, rtol=1e-5, atol=1e-5)
    # GIoU is invariant to per-axis scaling: pixels or normalised give the same cost
    torch.testing.assert_close(HungarianAssigner(cfg).cost_matrix(logits, boxes, labels, gt, None), want,
                               rtol=1e-5, atol=1e-5)


def test_softmax_cost():
    logits, boxes, labels, gt = _case(6, 3, seed=9)
    cfg = HungarianAssignerConfig(cost_class=1.0, cost_class_type="softmax", cost_bbox=0.0, cost_giou=0.0)
    cost = HungarianAssigner(cfg).cost_matrix(logits, boxes, labels, gt)
    torch.testing.assert_close(cost, -logits.softmax(-1)[:, labels])


def test_empty_gt_and_empty_predictions():
    logits, boxes, labels, gt = _case(10, 0)
    m = HungarianAssigner().match(logits, boxes, labels, gt, SIZE)
    assert m.pred_idx.shape == (0,) and m.gt_idx.shape == (0,) and m.pred_idx.dtype == torch.int64
    logits, boxes, labels, gt = _case(0, 3)
    m = HungarianAssigner().match(logits, boxes, labels, gt, SIZE)
    assert m.pred_idx.numel() == 0


def test_fewer_queries_than_gt_matches_min():
    logits, boxes, labels, gt = _case(2, 5, seed=11)
    m = HungarianAssigner().match(logits, boxes, labels, gt, SIZE)
    assert sorted(m.pred_idx.tolist()) == [0, 1] and len(set(m.gt_idx.tolist())) == 2


def test_non_finite_costs_warn_and_still_match():
    logits, boxes, labels, gt = _case(6, 3, seed=12)
    logits[2, :] = float("nan")
    boxes[4, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="logits, pred boxes"):
        m = HungarianAssigner().match(logits, boxes, labels, gt, SIZE)
    assert len(m.pred_idx) == 3
    assert not {2, 4} & set(m.pred_idx.tolist())  # invalid predictions are avoided (cost INVALID_COST)
    assert INVALID_COST > 1e6


def test_degenerate_boxes_are_diagnosed():
    logits, boxes, labels, gt = _case(4, 2, seed=13)
    boxes[0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    gt[0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    with pytest.warns(RuntimeWarning, match="degenerate"):
        m = HungarianAssigner().match(logits, boxes, labels, gt, None)
    assert len(m.pred_idx) == 2


def test_finite_costs_do_not_warn():
    logits, boxes, labels, gt = _case(6, 3, seed=14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HungarianAssigner().match(logits, boxes, labels, gt, SIZE)


def test_match_batch_equals_per_image_match():
    a = HungarianAssigner()
    cases = [_case(12, n, seed=20 + n) for n in (3, 0, 7)]
    logits = torch.stack([c[0] for c in cases])
    boxes = torch.stack([c[1] for c in cases])
    sizes = torch.tensor([[480, 640], [300, 500], [800, 600]])
    ms = a.match_batch(logits, boxes, [c[2] for c in cases], [c[3] for c in cases], sizes)
    for i, c in enumerate(cases):
        single = a.match(*c, sizes[i])
        assert torch.equal(ms[i].pred_idx, single.pred_idx) and torch.equal(ms[i].gt_idx, single.gt_idx)
        assert ms[i].pred_idx.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs():
    logits, boxes, labels, gt = (t.cuda() for t in _case(50, 6, seed=30))
    m = HungarianAssigner().match(logits, boxes, labels, gt, SIZE.cuda())
    ref = HungarianAssigner().match(*(t.cpu() for t in (logits, boxes, labels, gt)), SIZE)
    assert m.pred_idx.is_cuda
    assert torch.equal(m.pred_idx.cpu(), ref.pred_idx) and torch.equal(m.gt_idx.cpu(), ref.gt_idx)
