"""MaxIoUAssigner (MMDetection semantics) on hand-built cases."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torchvision.ops import box_iou

from codetr.assigners import max_iou as mi
from codetr.assigners.max_iou import (
    COMPONENT,
    MaxIoUAssigner,
    MaxIoUAssignerConfig,
    bbox_overlaps,
    build,
    to_mmdet_gt_inds,
)
from codetr.core.interfaces import OneToManyAssigner
from codetr.core.registry import Registry

NC = 5


def _assign(anchors, gts, labels=None, **cfg):
    a = MaxIoUAssigner(MaxIoUAssignerConfig(**cfg))
    return a.assign(torch.tensor(anchors, dtype=torch.float32), None, torch.tensor(gts, dtype=torch.float32),
                    None if labels is None else torch.tensor(labels), NC)


def test_component_and_config():
    assert COMPONENT.config is MaxIoUAssignerConfig and isinstance(build(MaxIoUAssignerConfig()), OneToManyAssigner)
    reg = Registry()
    assert reg.get("assigners", "max_iou") is COMPONENT
    cfg = reg.validate("assigners", {"type": "max_iou", "neg_iou_thr": [0.1, 0.3]})
    assert cfg.neg_iou_thr == (0.1, 0.3)
    with pytest.raises(ValidationError):
        MaxIoUAssignerConfig(neg_iou_thr=(0.5, 0.2))
    with pytest.raises(ValidationError):
        MaxIoUAssignerConfig(bogus=1)
    d = MaxIoUAssignerConfig()
    assert (d.pos_iou_thr, d.neg_iou_thr, d.min_pos_iou, d.match_low_quality, d.gt_max_assign_all,
            d.ignore_iof_thr) == (0.7, 0.3, 0.3, True, True, -1.0)


def test_bbox_overlaps_matches_torchvision_and_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 100
    a = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 50 + 1], 1)
    xy = torch.rand(7, 2, generator=g) * 100
    b = torch.cat([xy, xy + torch.rand(7, 2, generator=g) * 50 + 1], 1)
    full = bbox_overlaps(b, a)
    torch.testing.assert_close(full, box_iou(b, a), atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(mi, "_CHUNK_ELEMENTS", 10)
    assert torch.equal(bbox_overlaps(b, a), full)
    iof = bbox_overlaps(a, b, mode="iof")
    assert bool((iof <= 1 + 1e-6).all()) and iof.shape == (300, 7)
    assert bbox_overlaps(a[:0], b).shape == (0, 7)


def test_thresholds_pos_neg_ignored():
    gt = [[0, 0, 10, 10]]
    anchors = [[0, 0, 10, 10],    # IoU 1   -> pos
               [0, 0, 10, 8],     # IoU 0.8 -> pos
               [0, 0, 10, 5],     # IoU 0.5 -> ignored (between 0.3 and 0.7)
               [0, 0, 10, 2],     # IoU 0.2 -> neg
               [50, 50, 60, 60]]  # IoU 0   -> neg
    r = _assign(anchors, gt, [3], match_low_quality=False)
    assert r.gt_index.tolist() == [0, 0, -2, -1, -1]
    assert r.labels.tolist() == [3, 3, NC, NC, NC]
    torch.testing.assert_close(r.max_iou, torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0]))
    assert to_mmdet_gt_inds(r).tolist() == [1, 1, -1, 0, 0]
    assert r.num_pos == 2
    # negative range [0.1, 0.3): the IoU-0 box is ignored
    r = _assign(anchors, gt, [3], match_low_quality=False, neg_iou_thr=(0.1, 0.3))
    assert r.gt_index.tolist() == [0, 0, -2, -1, -2]


def test_low_quality_matches_later_gt_wins_and_assign_all():
    # anchor 0: IoU 0.4 with GT0 and 0.35 with GT1; it is the best box of both GTs.
    gts = [[0, 0, 10, 10], [2, 0, 12, 10]]
    a0 = [0, 0, 10, 4]                   # IoU with GT0 = 0.4, with GT1 = 32 / (40 + 100 - 32)
    anchors = [a0, [100, 100, 110, 110]]
    iou = bbox_overlaps(torch.tensor(gts, dtype=torch.float32), torch.tensor(anchors, dtype=torch.float32))
    assert iou[0, 0] > iou[1, 0] > 0.29
    r = _assign(anchors, gts, [1, 2], pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.29)
    # GT loop order: GT1 (later) overwrites GT0 although GT0 overlaps more (mmdet behaviour)
    assert r.gt_index.tolist() == [1, -1] and r.labels.tolist() == [2, NC]
    # min_pos_iou above GT1's best: only GT0 matches
    r = _assign(anchors, gts, [1, 2], min_pos_iou=0.38)
    assert r.gt_index.tolist() == [0, -1]
    # disabled: anchor 0 is ignored (IoU 0.4 between the thresholds)
    r = _assign(anchors, gts, [1, 2], match_low_quality=False)
    assert r.gt_index.tolist() == [-2, -1]
    # ties: both anchors reach GT's max; assign-all takes both, otherwise the first only
    anchors = [[0, 0, 5, 10], [5, 0, 10, 10]]
    assert _assign(anchors, [[0, 0, 10, 10]], [4]).gt_index.tolist() == [0, 0]
    assert _assign(anchors, [[0, 0, 10, 10]], [4], gt_max_assign_all=False).gt_index.tolist() == [0, -2]


def test_no_gt_no_boxes_and_class_agnostic():
    r = _assign([[0, 0, 1, 1], [2, 2, 3, 3]], torch.zeros(0, 4).tolist(), [])
    assert r.gt_index.tolist() == [-1, -1] and r.labels.tolist() == [NC, NC] and r.max_iou.tolist() == [0, 0]
    a = MaxIoUAssigner(MaxIoUAssignerConfig())
    r = a.assign(torch.zeros(0, 4), None, torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1]), NC)
    assert r.gt_index.shape == (0,) and r.labels.shape == (0,)
    r = _assign([[0, 0, 10, 10]], [[0, 0, 10, 10]], None)   # RPN: labels None -> class 0
    assert r.labels.tolist() == [0]


def test_ignore_regions():
    gts = [[0, 0, 10, 10]]
    anchors = [[100, 100, 110, 110], [200, 200, 210, 210]]
    ignore = torch.tensor([[95.0, 95, 120, 120]])
    a = MaxIoUAssigner(MaxIoUAssignerConfig(ignore_iof_thr=0.5))
    r = a.assign(torch.tensor(anchors, dtype=torch.float32), None, torch.tensor(gts, dtype=torch.float32),
                 torch.tensor([0]), NC, ignore_boxes_xyxy=ignore)
    assert r.gt_index.tolist() == [-2, -1]
    # default ignore_iof_thr = -1: ignore boxes unused
    r = MaxIoUAssigner(MaxIoUAssignerConfig()).assign(
        torch.tensor(anchors, dtype=torch.float32), None, torch.tensor(gts, dtype=torch.float32),
        torch.tensor([0]), NC, ignore_boxes_xyxy=ignore)
    assert r.gt_index.tolist() == [-1, -1]
