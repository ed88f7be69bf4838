"""ATSSHead behaviour without fixtures: config/registry, padding, crowd GT, empty images, gradients, predict."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from codetr.assigners.atss import ATSSAssigner, ATSSAssignerConfig
from codetr.core.interfaces import AuxHead, FeaturePyramid
from codetr.core.registry import registry
from codetr.core.structures import Batch, Target
from codetr.heads.atss import ATSSHead, ATSSHeadConfig, build_atss_head, official_atss_key_map

NC = 6
C = 32
STRIDES = [8, 16, 32, 64, 128]


def _pyramid(b: int, h: int = 64, w: int = 96, seed: int = 0) -> FeaturePyramid:
    g = torch.Generator().manual_seed(seed)
    maps, masks = [], []
    for s in STRIDES:
        hh, ww = -(-h // s), -(-w // s)
        maps.append(torch.randn(b, C, hh, ww, generator=g))
        masks.append(torch.zeros(b, hh, ww, dtype=torch.bool))
    return FeaturePyramid(maps, list(STRIDES), masks)


def _target(boxes, labels, crowd=None) -> Target:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(labels, dtype=torch.int64)
    crowd = torch.zeros(len(labels), dtype=torch.bool) if crowd is None else torch.tensor(crowd)
    return Target(boxes, labels, crowd)


def _batch(targets, sizes, h=64, w=96) -> Batch:
    b = len(targets)
    masks = torch.ones(b, h, w, dtype=torch.bool)
    for i, (hh, ww) in enumerate(sizes):
        masks[i, :hh, :ww] = False
    return Batch(torch.zeros(b, 3, h, w), masks, targets, torch.tensor(sizes), torch.tensor(sizes), list(range(b)))


def _head(**kw) -> ATSSHead:
    torch.manual_seed(0)
    return build_atss_head(ATSSHeadConfig(num_classes=NC, hidden_dim=C, feat_channels=C, norm_groups=8, **kw))


def test_config_defaults_and_registry():
    cfg = registry.validate("aux_heads", {"type": "atss", "num_classes": 3, "hidden_dim": 64,
                                          "assigner": {"type": "atss", "topk": 5}})
    assert isinstance(cfg, ATSSHeadConfig) and isinstance(cfg.assigner, ATSSAssignerConfig) and cfg.assigner.topk == 5
    d = ATSSHeadConfig()
    assert (d.loss_cls_weight, d.loss_bbox_weight, d.loss_centerness_weight) == (1.0, 2.0, 1.0)
    assert d.assigner.topk == 9 and d.bbox_stds == (0.1, 0.1, 0.2, 0.2) and d.anchor_scale == 8
    assert d.stacked_convs == 1 and d.nms_pre == 1000 and d.nms_iou == 0.6 and d.max_per_img == 100
    assert d.model_dump()["assigner"] == {"type": "atss", "topk": 9}
    with pytest.raises(ValidationError):
        ATSSHeadConfig(bogus=1)
    with pytest.raises(ValueError, match="num_classes"):
        build_atss_head(ATSSHeadConfig(hidden_dim=8))
    head = registry.build("aux_heads", cfg, 12.0)
    assert isinstance(head, AuxHead) and head.tag == "atss" and head.loss_scale == 12.0
    assert isinstance(head.assigner, ATSSAssigner) and head.assigner.topk == 5
    assert len(head.scales) == 5


def test_pyramid_levels_resolution():
    assert len(_head(num_levels=5).scales) == 6  # Co-DINO: 5 encoder levels + the adapter level
    assert len(_head(strides=[4, 8, 16, 32, 64, 128]).scales) == 6
    assert len(_head(pyramid_levels=3).scales) == 3
    with pytest.raises(ValueError):
        _head(strides=[8, 16], pyramid_levels=3)
    head = _head(num_levels=5)
    with pytest.raises(ValueError, match="pyramid_levels"):
        head(_pyramid(1))


def test_parameter_names_and_init():
    head = _head()
    keys = set(head.state_dict())
    for k in ["cls_convs.0.conv.weight", "cls_convs.0.gn.weight", "reg_convs.0.gn.bias", "atss_cls.bias",
              "atss_reg.weight", "atss_centerness.bias", "scales.4.scale"]:
        assert k in keys
    assert "cls_convs.0.conv.bias" not in keys
    assert official_atss_key_map("bbox_head.0.scales.3.scale") == "scales.3.scale"
    assert official_atss_key_map("bbox_head.1.atss_cls.weight", index=1) == "atss_cls.weight"
    assert official_atss_key_map("rpn_head.rpn_conv.weight") is None
    assert torch.allclose(head.atss_cls.bias, torch.full((NC,), -4.59511985))
    assert head.scales[0].scale.shape == () and head.scales[0].scale.item() == 1.0
    assert abs(head.atss_reg.weight.std().item() - 0.01) < 2e-3


def test_loss_padding_crowd_and_positive_coords():
    head = _head()
    pyr = _pyramid(2)
    t0 = _target([[4, 4, 60, 50], [40, 10, 90, 60]], [1, 4])
    t1 = _target([[2, 2, 40, 30], [0, 0, 48, 40]], [2, 5], crowd=[False, True])
    batch = _batch([t0, t1], [(64, 96), (40, 48)])
    out = head.loss(pyr, batch)
    assert set(out.losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    pc = out.positives
    n = sum(m.shape[-2] * m.shape[-1] for m in pyr.maps)
    assert len(pc.ref_boxes_xyxy) == 2
    for b in range(2):
        assert pc.ref_boxes_xyxy[b].shape == (n, 4) and pc.labels[b].shape == (n,)
        assert pc.target_boxes_xyxy[b].shape == (n, 4) and pc.feats[b].shape == (n, C)
        neg = pc.labels[b] == NC
        assert (pc.target_boxes_xyxy[b][neg] == 0).all()
    # image 1 is 40x48 inside a 64x96 canvas: anchors outside ceil(40/s) x ceil(48/s) are invalid ->
    # zero reference boxes with the background label (official unmap)
    tg = head.get_targets(pyr, batch)
    valid1 = tg.valid[1]
    assert (~valid1).any() and tg.valid[0].all()
    assert (pc.ref_boxes_xyxy[1][~valid1] == 0).all() and (pc.labels[1][~valid1] == NC).all()
    # crowd GT (label 5) is never assigned; only non-crowd labels appear
    assert set(pc.labels[1][pc.labels[1] < NC].tolist()) <= {2}
    assert set(pc.labels[0][pc.labels[0] < NC].tolist()) == {1, 4}
    # feats: the pyramid cell of each anchor (level 0, row 1, col 2 of image 0 = anchor 1 * W0 + 2)
    w0 = pyr.maps[0].shape[-1]
    torch.testing.assert_close(pc.feats[0][w0 + 2], pyr.maps[0][0, :, 1, 2])
    off = pyr.maps[0].shape[-2] * w0
    torch.testing.assert_close(pc.feats[1][off], pyr.maps[1][1, :, 0, 0])
    # dropping the crowd box changes nothing
    t1_nc = _target([[2, 2, 40, 30]], [2])
    out2 = head.loss(pyr, _batch([t0, t1_nc], [(64, 96), (40, 48)]))
    for k in out.losses:
        torch.testing.assert_close(out.losses[k], out2.losses[k])


def test_batch_of_duplicates_equals_single_image():
    """Normalisers are batch sums: two copies of one image give the single-image losses and positives."""
    head = _head()
    one = _pyramid(1)
    two = FeaturePyramid([torch.cat([m, m]) for m in one.maps], one.strides, [torch.cat([m, m]) for m in one.masks])
    t = _target([[4, 4, 60, 50], [40, 10, 90, 60]], [1, 4])
    o1 = head.loss(one, _batch([t], [(64, 96)]))
    o2 = head.loss(two, _batch([t, t], [(64, 96), (64, 96)]))
    for k in o1.losses:
        torch.testing.assert_close(o1.losses[k], o2.losses[k], rtol=1e-5, atol=1e-6)
    for b in range(2):
        assert torch.equal(o2.positives.labels[b], o1.positives.labels[0])


def test_loss_scale_multiplies_every_loss():
    pyr = _pyramid(1)
    batch = _batch([_target([[4, 4, 60, 50]], [1])], [(64, 96)])
    base = _head().loss(pyr, batch).losses
    scaled = _head()
    scaled.loss_scale = 12.0
    s = scaled.loss(pyr, batch).losses
    for k in base:
        torch.testing.assert_close(s[k], base[k] * 12.0)


def test_image_without_gt_gives_finite_losses_and_gradients_everywhere():
    head = _head()
    pyr = _pyramid(2)
    for m in pyr.maps:
        m.requires_grad_(True)
    batch = _batch([Target.empty(), Target.empty()], [(64, 96), (64, 96)])
    out = head.loss(pyr, batch)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["loss_bbox"].item() == 0 and out.losses["loss_centerness"].item() == 0
    assert out.losses["loss_cls"].item() > 0
    sum(out.losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert all((pc == NC).all() for pc in out.positives.labels)


def test_mixed_batch_gradients_flow_to_pyramid():
    head = _head()
    pyr = _pyramid(2)
    for m in pyr.maps:
        m.requires_grad_(True)
    batch = _batch([_target([[4, 4, 60, 50]], [3]), Target.empty()], [(64, 96), (64, 96)])
    out = head.loss(pyr, batch)
    (sum(out.losses.values()) + sum(f.sum() for f in out.positives.feats)).backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in pyr.maps)
    assert head.atss_reg.weight.grad.abs().sum() > 0
    assert not out.positives.ref_boxes_xyxy[0].requires_grad


def test_predict_shapes_and_frame():
    head = _head().eval()
    pyr = _pyramid(2)
    batch = _batch([Target.empty(), Target.empty()], [(64, 96), (40, 48)])
    dets = head.predict(pyr, batch)
    assert len(dets) == 2
    for det, (h, w) in zip(dets, [(64, 96), (40, 48)]):
        assert 0 < len(det) <= 100
        assert det.boxes.shape == (len(det), 4) and det.labels.dtype == torch.int64
        assert (det.boxes[:, 0::2] >= 0).all() and (det.boxes[:, 0::2] <= w).all()
        assert (det.boxes[:, 1::2] >= 0).all() and (det.boxes[:, 1::2] <= h).all()
        assert (det.scores[:-1] >= det.scores[1:]).all()
        assert ((det.labels >= 0) & (det.labels < NC)).all()


def test_prediction_aware_assigner_receives_detached_predictions():
    seen = {}

    class Recorder(ATSSAssigner):
        uses_predictions = True

        def assign(self, anchors_xyxy, num_per_level, gt_boxes_xyxy, gt_labels, num_classes, pred_scores=None,
                   pred_boxes_xyxy=None, ignore_boxes_xyxy=None):
            seen["scores"], seen["boxes"] = pred_scores, pred_boxes_xyxy
            return super().assign(anchors_xyxy, num_per_level, gt_boxes_xyxy, gt_labels, num_classes)

    head = _head()
    head.assigner = Recorder()
    pyr = _pyramid(1)
    head.loss(pyr, _batch([_target([[4, 4, 60, 50]], [1])], [(64, 96)]))
    n = sum(m.shape[-2] * m.shape[-1] for m in pyr.maps)
    assert seen["scores"].shape == (n, NC) and seen["boxes"].shape == (n, 4)
    assert not seen["scores"].requires_grad and ((seen["scores"] > 0) & (seen["scores"] < 1)).all()
