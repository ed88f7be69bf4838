"""RandomSampler (MMDetection semantics): counts, order, GT-as-proposals, RNG consumption."""

from __future__ import annotations

import torch

from codetr.assigners.sampler import RandomSampler
from codetr.core.interfaces import AssignResult

NC = 3


def _result(gt_index: list[int], labels_of_gt: list[int]) -> AssignResult:
    g = torch.tensor(gt_index)
    lab = torch.tensor([labels_of_gt[i] if i >= 0 else NC for i in gt_index])
    return AssignResult(gt_index=g, max_iou=torch.linspace(0, 1, len(gt_index)), labels=lab)


def _boxes(n: int) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return torch.cat([x, x, x + 5, x + 5, x / 100], 1)   # extra score column is dropped


def test_counts_order_and_fields():
    gt_index = [-1] * 40 + [0] * 10 + [1] * 10 + [-2] * 5   # 20 positives, 40 negatives, 5 ignored
    boxes = _boxes(65)
    res = RandomSampler(num=16, pos_fraction=0.25, add_gt_as_proposals=False).sample(
        _result(gt_index, [1, 2]), boxes, torch.tensor([[0.0, 0, 9, 9], [1.0, 1, 8, 8]]), torch.tensor([1, 2]))
    assert res.num_pos == 4 and res.num_neg == 12
    assert torch.equal(res.pos_inds, res.pos_inds.sort().values)
    assert torch.equal(res.neg_inds, res.neg_inds.sort().values)
    assert bool((res.pos_inds >= 40).all() & (res.pos_inds < 60).all()) and bool((res.neg_inds < 40).all())
    assert torch.equal(res.boxes, boxes[torch.cat([res.pos_inds, res.neg_inds]), :4])   # positives first
    gti = torch.tensor(gt_index)[res.pos_inds]
    assert torch.equal(res.pos_assigned_gt_inds, gti)
    assert res.pos_labels.tolist() == [[1, 2][i] for i in gti.tolist()]
    assert torch.equal(res.pos_gt_boxes, torch.tensor([[0.0, 0, 9, 9], [1.0, 1, 8, 8]])[gti])
    assert not bool(res.pos_is_gt.any())


def test_add_gt_as_proposals_prepends_gts():
    gt_boxes = torch.tensor([[0.0, 0, 9, 9], [1.0, 1, 8, 8]])
    res = RandomSampler(num=8, pos_fraction=0.5, add_gt_as_proposals=True).sample(
        _result([-1, 0, -1, -1], [2, 0]), _boxes(4), gt_boxes, torch.tensor([2, 0]))
    assert res.pos_inds.tolist() == [0, 1, 3]          # GT 0, GT 1, proposal 1 (index 1 + 2)
    assert res.pos_is_gt.tolist() == [True, True, False]
    assert torch.equal(res.pos_boxes[:2], gt_boxes)
    assert res.pos_labels.tolist() == [2, 0, 2] and res.pos_assigned_gt_inds.tolist() == [0, 1, 0]
    assert res.neg_inds.tolist() == [2, 4, 5]


def test_global_rng_consumption_matches_mmdet():
    """One randperm over the negatives (positives below the cap draw nothing), on the global CPU RNG."""
    gt_index = [-1] * 100 + [0] * 3
    sampler = RandomSampler(num=20, pos_fraction=0.5, add_gt_as_proposals=False)
    torch.manual_seed(7)
    res = sampler.sample(_result(gt_index, [1]), _boxes(103), torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([1]))
    after = torch.rand(1)
    torch.manual_seed(7)
    expected = torch.randperm(100)[:17].sort().values
    assert torch.equal(res.neg_inds, expected) and res.pos_inds.tolist() == [100, 101, 102]
    assert torch.equal(after, torch.rand(1))
    # more positives than allowed: randperm over positives first, then over negatives
    gt_index = [-1] * 50 + [0] * 30
    torch.manual_seed(3)
    res = sampler.sample(_result(gt_index, [1]), _boxes(80), torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([1]))
    torch.manual_seed(3)
    pos = (torch.randperm(30)[:10] + 50).sort().values
    neg = torch.randperm(50)[:10].sort().values
    assert torch.equal(res.pos_inds, pos) and torch.equal(res.neg_inds, neg)


def test_generator_leaves_global_rng_alone_and_neg_pos_ub():
    gt_index = [-1] * 100 + [0] * 2
    sampler = RandomSampler(num=64, pos_fraction=0.25, neg_pos_ub=3, add_gt_as_proposals=False)
    state = torch.get_rng_state()
    a = sampler.sample(_result(gt_index, [1]), _boxes(102), torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([1]),
                       generator=torch.Generator().manual_seed(1))
    b = sampler.sample(_result(gt_index, [1]), _boxes(102), torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([1]),
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.neg_inds, b.neg_inds) and a.num_pos == 2 and a.num_neg == 6   # 3 x 2 positives


def test_no_gt():
    res = RandomSampler(num=4, pos_fraction=0.5).sample(
        _result([-1] * 6, []), _boxes(6), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
        generator=torch.Generator().manual_seed(0))
    assert res.num_pos == 0 and res.num_neg == 4 and res.pos_gt_boxes.shape == (0, 4) and res.num_gts == 0
