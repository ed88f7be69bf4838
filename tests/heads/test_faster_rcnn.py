"""FasterRCNNHead behaviour on small random inputs: batching, padding, empty/crowd GT, gradients, RNG,
config, registry, prediction and the MMCV-style NMS helpers."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torchvision.ops import batched_nms as tv_batched_nms

from codetr.core.interfaces import AuxHead, FeaturePyramid
from codetr.core.registry import Registry
from codetr.core.structures import Batch, Target
from codetr.heads.faster_rcnn import (
    COMPONENT,
    FasterRCNNHead,
    FasterRCNNHeadConfig,
    official_faster_rcnn_key_map,
)
from codetr.ops.nms import batched_nms, multiclass_nms
from codetr.heads.roi_head import map_roi_levels

NC = 5
C = 32
STRIDES = [8, 16, 32, 64]


def _head(**kw) -> FasterRCNNHead:
    torch.manual_seed(0)
    cfg = FasterRCNNHeadConfig(num_classes=NC, hidden_dim=C, feat_channels=32, fc_out_channels=64, **kw)
    return FasterRCNNHead(cfg, loss_scale=kw.pop("loss_scale", 1.0))


def _inputs(targets: list[Target], sizes=((128, 160), (96, 120)), requires_grad: bool = True):
    g = torch.Generator().manual_seed(1)
    h, w = 128, 160
    maps = [torch.randn(len(targets), C, -(-h // s), -(-w // s), generator=g).requires_grad_(requires_grad)
            for s in STRIDES]
    masks = [torch.zeros(len(targets), m.shape[2], m.shape[3], dtype=torch.bool) for m in maps]
    img_masks = torch.ones(len(targets), h, w, dtype=torch.bool)
    for b, (hh, ww) in enumerate(sizes[:len(targets)]):
        img_masks[b, :hh, :ww] = False
    batch = Batch(images=torch.zeros(len(targets), 3, h, w), masks=img_masks, targets=targets,
                  image_sizes=torch.tensor(sizes[:len(targets)]), orig_sizes=torch.tensor(sizes[:len(targets)]),
                  image_ids=list(range(len(targets))))
    return FeaturePyramid(maps, STRIDES, masks), batch


def _target(boxes, labels, crowd=None) -> Target:
    n = len(labels)
    return Target(torch.tensor(boxes, dtype=torch.float32).view(n, 4), torch.tensor(labels, dtype=torch.long),
                  torch.tensor(crowd if crowd is not None else [False] * n))


def test_batch_with_empty_image_losses_grads_and_positives():
    head = _head()
    assert isinstance(head, AuxHead) and head.tag == "rcnn"
    targets = [_target([[10, 10, 90, 100], [60, 20, 150, 80]], [1, 3]), _target([], [])]
    pyr, batch = _inputs(targets)
    head.generator = torch.Generator().manual_seed(0)
    out = head.loss(pyr, batch)
    assert set(out.losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values())
    assert "acc" in head.metrics and not head.metrics["acc"].requires_grad
    sum(out.losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
    assert all(m.grad is not None for m in pyr.maps)
    pc = out.positives
    n = pc.ref_boxes_xyxy[0].shape[0]
    assert all(x.shape[0] == n for x in pc.ref_boxes_xyxy + pc.labels + pc.target_boxes_xyxy + pc.feats)
    assert n <= 512 and pc.feats[0].shape == (n, C) and pc.feats[0].requires_grad
    assert not pc.ref_boxes_xyxy[0].requires_grad
    # image 0: GT boxes first; image 1: no GT -> every candidate is background with zero targets
    torch.testing.assert_close(pc.ref_boxes_xyxy[0][:2], targets[0].boxes)
    assert pc.labels[0][:2].tolist() == [1, 3]
    assert bool((pc.labels[1] == NC).all()) and bool((pc.target_boxes_xyxy[1] == 0).all())
    # positives of image 0 target their assigned GT
    pos = pc.labels[0] < NC
    assert bool(pos[:int(pos.sum())].all())   # positives first


def test_all_images_without_gt_touch_every_parameter():
    head = _head()
    pyr, batch = _inputs([_target([], []), _target([], [])])
    head.generator = torch.Generator().manual_seed(0)
    out = head.loss(pyr, batch)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["loss_bbox"].item() == 0 and out.losses["loss_rpn_bbox"].item() == 0
    sum(out.losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name


def test_crowd_gt_is_never_a_target():
    head = _head()
    pyr, batch = _inputs([_target([[10, 10, 90, 100]], [2], [True])], requires_grad=False)
    head.generator = torch.Generator().manual_seed(0)
    out = head.loss(pyr, batch)
    assert bool((out.positives.labels[0] == NC).all())
    assert head.metrics["rpn_num_pos"].item() == 0 and head.metrics["roi_num_pos"].item() == 0


def test_generator_determinism_global_rng_untouched_and_loss_scale():
    targets = [_target([[10, 10, 90, 100], [60, 20, 150, 80]], [1, 3])]
    pyr, batch = _inputs(targets, requires_grad=False)
    head = _head()
    state = torch.get_rng_state()
    head.generator = torch.Generator().manual_seed(5)
    a = head.loss(pyr, batch).losses
    head.generator = torch.Generator().manual_seed(5)
    b = head.loss(pyr, batch).losses
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    head.loss_scale = 3.0
    head.generator = torch.Generator().manual_seed(5)
    c = head.loss(pyr, batch).losses
    for k in a:
        torch.testing.assert_close(c[k], 3.0 * a[k])


def test_predict_in_valid_image():
    head = _head().eval()
    pyr, batch = _inputs([_target([], []), _target([], [])], requires_grad=False)
    dets = head.predict(pyr, batch)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, batch.image_sizes.tolist()):
        assert 0 < len(d) <= 100 and d.boxes.shape == (len(d), 4)
        assert bool((d.boxes[:, 0::2] <= w).all() & (d.boxes[:, 1::2] <= h).all() & (d.boxes >= 0).all())
        assert bool((d.labels < NC).all()) and bool((d.scores[:-1] >= d.scores[1:]).all())


def test_config_registry_and_key_map():
    reg = Registry()
    comp = reg.get("aux_heads", "faster_rcnn")
    assert comp is COMPONENT
    cfg = reg.validate("aux_heads", {"type": "faster_rcnn", "num_classes": NC, "hidden_dim": C,
                                     "fc_out_channels": 16, "roi_assigner": {"pos_iou_thr": 0.6}})
    assert (cfg.roi_assigner.pos_iou_thr, cfg.roi_assigner.neg_iou_thr, cfg.roi_assigner.match_low_quality) == (
        0.6, 0.5, False)
    head = reg.build("aux_heads", cfg, 12.0)
    assert head.loss_scale == 12.0
    d = FasterRCNNHeadConfig()
    assert (d.finest_scale, d.fc_out_channels, d.loss_bbox_weight, d.rpn_sampler.num, d.roi_sampler.num) == (
        56.0, 1024, 10.0, 256, 512)
    assert d.rpn_train_proposals.nms_pre == 4000 and d.rpn_test_proposals.nms_pre == 1000
    with pytest.raises(ValidationError):
        FasterRCNNHeadConfig(bogus=1)
    with pytest.raises(ValueError, match="num_classes"):
        FasterRCNNHead(FasterRCNNHeadConfig(hidden_dim=C))
    with pytest.raises(ValueError, match="roi_strides"):
        h = _head(roi_strides=(4, 8))
        pyr, batch = _inputs([_target([], [])])
        h.roi_levels(pyr)
    keys = set(_head().state_dict())
    assert official_faster_rcnn_key_map("roi_head.0.bbox_head.fc_cls.weight") in keys
    assert official_faster_rcnn_key_map("rpn_head.rpn_conv.weight") in keys
    assert official_faster_rcnn_key_map("bbox_head.0.atss_cls.weight") is None


def test_roi_level_mapping():
    # level = floor(log2(sqrt(wh) / finest_scale + 1e-6)) clamped: [0, 2s) -> 0, [2s, 4s) -> 1, ...
    rois = torch.tensor([[0, 0, 0, 50, 50], [0, 0, 0, 230, 230], [0, 0, 0, 460, 460], [0, 0, 0, 2000, 2000.]])
    assert map_roi_levels(rois, 4, 112).tolist() == [0, 1, 2, 3]
    assert map_roi_levels(rois, 4, 56).tolist() == [0, 2, 3, 3]
    assert map_roi_levels(torch.tensor([[0, 0, 0, 111.9, 224.1]]), 4, 56).tolist() == [1]


def test_nms_helpers():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=g) * 40 + 1], 1)
    scores = torch.rand(300, generator=g)
    idxs = torch.randint(0, 4, (300,), generator=g)
    keep, s = batched_nms(boxes, scores, idxs, 0.5)
    assert set(keep.tolist()) == set(tv_batched_nms(boxes, scores, idxs, 0.5).tolist())
    assert torch.equal(s, scores[keep]) and bool((s[:-1] >= s[1:]).all())
    keep2, _ = batched_nms(boxes, scores, idxs, 0.5, split_thr=10)   # per-group path
    assert set(keep2.tolist()) == set(keep.tolist())
    cls_scores = torch.rand(50, NC + 1, generator=g).softmax(-1)
    b, sc, lab = multiclass_nms(boxes[:50].repeat(1, NC), cls_scores, 0.05, 0.5, max_num=20)
    assert len(b) <= 20 and bool((sc > 0.05).all()) and bool((lab < NC).all())
