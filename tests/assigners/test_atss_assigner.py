"""ATSSAssigner on hand-computed cases (thresholds worked out in the comments) + a brute-force cross-check."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from codetr.assigners.atss import COMPONENT, ATSSAssigner, ATSSAssignerConfig, build_atss_assigner, pairwise_iou
from codetr.core.interfaces import OneToManyAssigner
from codetr.core.registry import registry

C = 5  # num_classes (background label)


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_config_and_component():
    cfg = ATSSAssignerConfig()
    assert cfg.type == "atss" and cfg.topk == 9
    with pytest.raises(ValidationError):
        ATSSAssignerConfig(topk=0)
    with pytest.raises(ValidationError):
        ATSSAssignerConfig(topk=9, foo=1)
    a = build_atss_assigner(ATSSAssignerConfig(topk=3))
    assert isinstance(a, OneToManyAssigner) and a.kind == "one_to_many" and a.topk == 3
    assert COMPONENT.config is ATSSAssignerConfig
    assert registry.get("assigners", "atss").config is ATSSAssignerConfig
    assert registry.validate("assigners", {"type": "atss", "topk": 4}).topk == 4


def test_single_gt_mean_plus_std_threshold():
    # GT [0,0,10,10], centre (5,5). topk=3 -> the 3 closest centres: a0 (d=0), a1 (d=2), a4 (d=4).
    # IoUs: a0 = 1, a1 = 80/120 = 2/3, a4 = 60/140 = 3/7. mean = 0.69841, unbiased std = 0.28703,
    # thr = 0.98544 -> only a0 is positive.
    anchors = _t([[0, 0, 10, 10], [2, 0, 12, 10], [5, 5, 15, 15], [20, 20, 30, 30], [0, 4, 10, 14]])
    gt = _t([[0, 0, 10, 10]])
    res = ATSSAssigner(ATSSAssignerConfig(topk=3)).assign(anchors, [5], gt, torch.tensor([3]), C)
    assert res.gt_index.tolist() == [0, -1, -1, -1, -1]
    assert res.labels.tolist() == [3, C, C, C, C]
    assert res.num_pos == 1
    # max_iou: the matched IoU for positives, the best IoU for negatives
    torch.testing.assert_close(res.max_iou, _t([1.0, 2 / 3, 1 / 7, 0.0, 3 / 7]))


def test_unbiased_std_like_official():
    # topk=2 candidates with IoU 1 and 0.5: mean 0.75; unbiased std = 0.5/sqrt(2) = 0.35355 -> thr 1.1036:
    # NO positive (a biased std 0.25 would give thr 1.0 and make a0 positive). The official uses Tensor.std().
    anchors = _t([[0, 0, 10, 10], [0, 0, 10, 20], [40, 40, 50, 50]])
    gt = _t([[0, 0, 10, 10]])
    res = ATSSAssigner(ATSSAssignerConfig(topk=2)).assign(anchors, [3], gt, torch.tensor([1]), C)
    assert res.num_pos == 0
    assert res.labels.tolist() == [C, C, C]


@pytest.mark.parametrize("x1,positive", [(-4.995, False), (-4.98, True)])
def test_centre_must_be_inside_gt_with_margin(x1, positive):
    # Only b0 overlaps the GT; for candidates [x, 0, 0] the threshold is x (1/3 + 1/sqrt(3)) < x, so b0 passes
    # the IoU test. Its centre x is x1 + 5: 0.005 from the GT's left edge (< 0.01 margin -> rejected) or 0.02.
    anchors = _t([[x1, 0, x1 + 10, 10], [-10, -10, 0, 0], [20, 0, 30, 10]])
    gt = _t([[0, 0, 10, 10]])
    res = ATSSAssigner(ATSSAssignerConfig(topk=3)).assign(anchors, [3], gt, torch.tensor([2]), C)
    assert res.gt_index.tolist() == ([0, -1, -1] if positive else [-1, -1, -1])


@pytest.mark.parametrize("swap", [False, True])
def test_anchor_positive_for_two_gts_goes_to_max_iou(swap):
    # c0 = [1,0,11,10]: IoU 90/110 = 0.818 with A = [0,0,10,10], 90/130 = 0.692 with B = [2,0,14,10];
    # both pass (single non-zero candidate IoU) and c0's centre (6,5) is inside both -> A wins by IoU.
    a_box, b_box = [0, 0, 10, 10], [2, 0, 14, 10]
    gts = _t([b_box, a_box] if swap else [a_box, b_box])
    labels = torch.tensor([4, 1] if swap else [1, 4])
    anchors = _t([[1, 0, 11, 10], [50, 50, 60, 60], [-60, -60, -50, -50]])
    res = ATSSAssigner(ATSSAssignerConfig(topk=3)).assign(anchors, [3], gts, labels, C)
    a_idx = 1 if swap else 0
    assert res.gt_index.tolist() == [a_idx, -1, -1]
    assert res.labels.tolist() == [1, C, C]
    assert res.max_iou[0].item() == pytest.approx(90 / 110)


def test_exact_iou_tie_goes_to_first_gt():
    # [1,0,11,10] has IoU exactly 90/110 with both [0,0,10,10] and [2,0,12,10]
    anchors = _t([[1, 0, 11, 10], [50, 50, 60, 60], [-60, -60, -50, -50]])
    gts = _t([[2, 0, 12, 10], [0, 0, 10, 10]])
    res = ATSSAssigner(ATSSAssignerConfig(topk=3)).assign(anchors, [3], gts, torch.tensor([2, 3]), C)
    assert res.gt_index.tolist() == [0, -1, -1]


def test_topk_is_per_level_and_capped_by_level_size():
    # level 0: 3 anchors, level 1: 1 anchor; topk=2 -> 2 + 1 candidates.
    # Candidates of GT [0,0,16,16] (centre 8,8): level 0 -> l0a [0,0,16,16] (IoU 1), l0b [4,0,20,16] (IoU 0.6);
    # level 1 -> l1 [-8,-8,24,24] (IoU 0.25). mean 0.61667, unbiased std 0.37528 -> thr 0.99195 -> only l0a.
    anchors = _t([[0, 0, 16, 16], [4, 0, 20, 16], [40, 40, 56, 56], [-8, -8, 24, 24]])
    gt = _t([[0, 0, 16, 16]])
    res = ATSSAssigner(ATSSAssignerConfig(topk=2)).assign(anchors, [3, 1], gt, torch.tensor([0]), C)
    assert res.gt_index.tolist() == [0, -1, -1, -1]
    # with one level of 4 anchors, topk=2 picks l0a and l1 (both at distance 0): IoUs 1, 0.25:
    # mean 0.625, std 0.53033 -> thr 1.155 -> no positive: the per-level split matters
    res1 = ATSSAssigner(ATSSAssignerConfig(topk=2)).assign(anchors, [4], gt, torch.tensor([0]), C)
    assert res1.num_pos == 0


def test_no_gt_and_no_anchor():
    anchors = _t([[0, 0, 10, 10], [5, 5, 15, 15]])
    res = ATSSAssigner().assign(anchors, [2], torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), C)
    assert res.gt_index.tolist() == [-1, -1] and res.labels.tolist() == [C, C]
    assert res.max_iou.tolist() == [0.0, 0.0]
    res = ATSSAssigner().assign(torch.zeros(0, 4), [0], _t([[0, 0, 1, 1]]), torch.tensor([0]), C)
    assert res.gt_index.shape == (0,) and res.labels.shape == (0,)


def test_errors():
    anchors = _t([[0, 0, 10, 10]])
    with pytest.raises(ValueError, match="num_per_level"):
        ATSSAssigner().assign(anchors, [2], _t([[0, 0, 10, 10]]), torch.tensor([0]), C)
    with pytest.raises(NotImplementedError):
        ATSSAssigner().assign(anchors, [1], _t([[0, 0, 10, 10]]), torch.tensor([0]), C,
                              ignore_boxes_xyxy=_t([[0, 0, 5, 5]]))


# --------------------------------------------------------------------------- brute force cross-check
def _naive_atss(anchors, num_per_level, gts, labels, topk):
    a = anchors.double()
    g = gts.double()
    iou = pairwise_iou(a, g)
    acx, acy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
    best = {}
    for j in range(g.shape[0]):
        gcx, gcy = (g[j, 0] + g[j, 2]) / 2, (g[j, 1] + g[j, 3]) / 2
        cand, start = [], 0
        for n in num_per_level:
            d = [(math.hypot(acx[i] - gcx, acy[i] - gcy), i) for i in range(start, start + n)]
            cand += [i for _, i in sorted(d)[: min(topk, n)]]
            start += n
        vals = torch.stack([iou[i, j] for i in cand])
        thr = vals.mean() + vals.std()
        for i in cand:
            inside = min(acx[i] - g[j, 0], acy[i] - g[j, 1], g[j, 2] - acx[i], g[j, 3] - acy[i]) > 0.01
            if iou[i, j] >= thr and inside and (i not in best or iou[i, j] > iou[i, best[i]]):
                best[i] = j
    out = [-1] * a.shape[0]
    for i, j in best.items():
        out[i] = j
    return out


def test_matches_brute_force_on_random_scenes():
    g = torch.Generator().manual_seed(0)
    total_pos = 0
    for trial in range(5):
        strides = [8, 16, 32]
        anchors, npl = [], []
        for s, (h, w) in zip(strides, [(8, 10), (4, 5), (2, 3)]):
            ys, xs = torch.meshgrid(torch.arange(h) * s, torch.arange(w) * s, indexing="ij")
            c = torch.stack([xs.flatten(), ys.flatten()], 1).float()
            # irrational-ish jitter keeps distances tie-free so top-k sets are unambiguous
            c = c + torch.rand(c.shape, generator=g) * 0.37
            anchors.append(torch.cat([c - 4 * s, c + 4 * s], 1))
            npl.append(h * w)
        anchors = torch.cat(anchors)
        n = 1 + trial
        xy = torch.rand(n, 2, generator=g) * 60
        wh = 8 + torch.rand(n, 2, generator=g) * 50
        gts = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, C, (n,), generator=g)
        res = ATSSAssigner(ATSSAssignerConfig(topk=9)).assign(anchors, npl, gts, labels, C)
        expect = _naive_atss(anchors, npl, gts, labels, 9)
        assert res.gt_index.tolist() == expect
        pos = res.gt_index >= 0
        assert torch.equal(res.labels[pos], labels[res.gt_index[pos]])
        assert (res.labels[~pos] == C).all()
        total_pos += res.num_pos
    assert total_pos >= 20
