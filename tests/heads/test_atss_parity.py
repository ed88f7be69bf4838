"""ATSS aux head + multi-scale adapter against the official fixtures.

* ``co_deformable_detr_official_small`` (official Co-DETR, MMDetection 2.25): ``atss.pt`` (raw outputs,
  anchors, assignment, per-level losses x4.0 = base weights x ``loss_scale`` 2 layers x lambda_2 2.0),
  ``aux_queries.pt['atss_group']`` (the positives handed to the customized positive queries) and the
  adapter's 5th level (``features.pt`` ``aux_pyramid``).
* ``co_dino_mmdet3_small`` (MMDetection 3.x port, 6 levels, strides 4..128): ``atss_head_eval.pt`` (raw
  outputs + one-stage predictions), ``atss_assign_loss.pt``, ``train_internals_seed2.pt`` ATSS aux targets
  and the adapter's 6th level (``encoder_pyramid.pt``).

Tolerances (fixture READMEs): features/logits 1e-4 abs, boxes 1e-3 px, losses 1e-5 (relative to the
value), integers exact.
"""

from __future__ import annotations

import pytest
import torch

from codetr.core.interfaces import FeaturePyramid
from codetr.core.structures import Batch, Target, normalize_boxes
from codetr.heads.adapter import MultiScaleAdapter, official_adapter_key_map
from codetr.heads.atss import ATSSHead, ATSSHeadConfig, official_atss_state_dict
from tests._reference import load_int8exact_state_dict, load_safetensors_state_dict, reference_dir

pytestmark = pytest.mark.parity

LOGIT_ATOL = 1e-4
BOX_ATOL = 1e-3
LOSS_RTOL = 1e-5
HW = torch.tensor([256, 320])


def _pyramid(maps, strides):
    return FeaturePyramid(list(maps), list(strides), [torch.zeros(m.shape[0], *m.shape[-2:], dtype=torch.bool)
                                                     for m in maps])


def _batch(boxes, labels):
    return Batch(images=torch.zeros(1, 3, 256, 320), masks=torch.zeros(1, 256, 320, dtype=torch.bool),
                 targets=[Target(boxes.float(), labels.long(), torch.zeros(len(labels), dtype=torch.bool))],
                 image_sizes=HW[None].clone(), orig_sizes=torch.tensor([[512, 512]]), image_ids=[0])


def _close_loss(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=LOSS_RTOL, atol=1e-6)


# --------------------------------------------------------------------------- Co-Deformable-DETR (official)
@pytest.fixture(scope="module")
def codef():
    d = reference_dir("co_deformable_detr_official_small")
    sd = load_safetensors_state_dict(d / "state_dict.safetensors")
    inp = torch.load(d / "inputs.pt")
    gtb = inp["gt_bboxes"][0] if isinstance(inp["gt_bboxes"], (list, tuple)) else inp["gt_bboxes"]
    gtl = inp["gt_labels"][0] if isinstance(inp["gt_labels"], (list, tuple)) else inp["gt_labels"]
    head = ATSSHead(ATSSHeadConfig(num_classes=80, hidden_dim=256), loss_scale=2 * 2.0)  # num_dec_layer 2 x lambda_2 2.0
    head.load_state_dict(official_atss_state_dict(sd), strict=True)
    head.eval()
    return dict(sd=sd, head=head, feats=torch.load(d / "features.pt"), atss=torch.load(d / "atss.pt"),
                aux=torch.load(d / "aux_queries.pt")["atss_group"], batch=_batch(gtb, gtl))


def test_codef_raw_outputs(codef):
    pyr = _pyramid(codef["feats"]["aux_pyramid"], [8, 16, 32, 64, 128])
    with torch.no_grad():
        cls, reg, ctr = codef["head"](pyr)
    ref = codef["atss"]
    for ours, theirs in [(cls, ref["cls_scores"]), (reg, ref["bbox_preds"]), (ctr, ref["centernesses"])]:
        assert len(ours) == len(theirs) == 5
        for o, t in zip(ours, theirs):
            torch.testing.assert_close(o, t, atol=LOGIT_ATOL, rtol=0)


def test_codef_anchors_and_assignment(codef):
    pyr = _pyramid(codef["feats"]["aux_pyramid"], [8, 16, 32, 64, 128])
    ref = codef["atss"]
    tg = codef["head"].get_targets(pyr, codef["batch"])
    assert tg.num_per_level == [a.shape[0] for a in ref["anchors_per_level"]] == [1280, 320, 80, 20, 6]
    torch.testing.assert_close(tg.anchors, ref["anchors"], atol=0, rtol=0)
    assert torch.equal(tg.labels[0], ref["labels"])
    assert torch.equal(tg.gt_index[0] + 1, ref["assigned_gt_inds"])  # official: 1-based, 0 = negative
    torch.testing.assert_close(tg.bbox_targets[0], ref["bbox_targets"], atol=0, rtol=0)
    pos = ref["assigned_gt_inds"] > 0
    torch.testing.assert_close(tg.max_iou[0][pos], ref["max_overlaps"][pos], atol=1e-6, rtol=0)
    # official max_overlaps holds -1e8 on negatives; ours holds the best IoU there (documented deviation)
    assert (ref["max_overlaps"][~pos] == -1e8).all() and (tg.max_iou[0][~pos] >= 0).all()
    assert tg.num_pos == [ref["num_pos"]] == [29]
    assert torch.bincount(tg.gt_index[0][tg.gt_index[0] >= 0]).tolist() == [9, 11, 9]
    starts = [0, 1280, 1600, 1680, 1700, 1706]
    assert [int((tg.gt_index[0][a:b] >= 0).sum()) for a, b in zip(starts, starts[1:])] == [3, 17, 9, 0, 0]


def test_codef_losses(codef):
    head, ref = codef["head"], codef["atss"]
    pyr = _pyramid(codef["feats"]["aux_pyramid"], [8, 16, 32, 64, 128])
    with torch.no_grad():
        outputs = head(pyr)
        per_level = head.loss_per_level(outputs, head.get_targets(pyr, codef["batch"]))
        out = head.loss(pyr, codef["batch"])
    for name in ("loss_cls", "loss_bbox", "loss_centerness"):
        theirs = torch.stack(ref[f"{name}_per_level"])
        _close_loss(torch.stack(per_level[name]), theirs)
        _close_loss(out.losses[name], theirs.sum())
    assert set(out.losses) == {"loss_cls", "loss_bbox", "loss_centerness"}


def test_codef_positive_coords_match_atss_group(codef):
    head, ref, aux = codef["head"], codef["atss"], codef["aux"]
    pyr = _pyramid(codef["feats"]["aux_pyramid"], [8, 16, 32, 64, 128])
    with torch.no_grad():
        pc = head.loss(pyr, codef["batch"]).positives
    assert pc.tag == "atss"
    assert pc.ref_boxes_xyxy[0].shape == (1706, 4) and pc.feats[0].shape == (1706, 256)
    torch.testing.assert_close(pc.ref_boxes_xyxy[0], ref["anchors"], atol=0, rtol=0)  # no padding: all valid
    assert torch.equal(pc.labels[0], ref["labels"])
    torch.testing.assert_close(pc.target_boxes_xyxy[0], ref["bbox_targets"], atol=0, rtol=0)
    pos = pc.labels[0] < 80
    assert int(pos.sum()) == aux["aux_coords"].shape[1] == 29
    torch.testing.assert_close(normalize_boxes(pc.ref_boxes_xyxy[0][pos], HW), aux["aux_coords"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize_boxes(pc.target_boxes_xyxy[0][pos], HW), aux["aux_targets"][0],
                               atol=1e-6, rtol=0)
    assert torch.equal(pc.labels[0][pos], aux["aux_labels"][0])
    torch.testing.assert_close(pc.feats[0][pos], aux["aux_feats"][0], atol=LOGIT_ATOL, rtol=0)


def test_codef_adapter_extra_level(codef):
    sd = codef["sd"]
    adapter = MultiScaleAdapter(256)
    mapped = {official_adapter_key_map(k): v for k, v in sd.items() if official_adapter_key_map(k)}
    assert set(mapped) == {"downsample.0.weight", "downsample.0.bias", "downsample.1.weight", "downsample.1.bias"}
    adapter.load_state_dict(mapped, strict=True)
    levels = codef["feats"]["aux_pyramid"][:4]
    masks = [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x in levels]
    with torch.no_grad():
        pyr = adapter(levels, masks, [8, 16, 32, 64])
    assert pyr.strides == [8, 16, 32, 64, 128]
    assert pyr.spatial_shapes[-1] == (2, 3) and not pyr.masks[-1].any()
    for i in range(4):
        assert pyr.maps[i] is levels[i]
    torch.testing.assert_close(pyr.maps[4], codef["feats"]["aux_pyramid"][4], atol=LOGIT_ATOL, rtol=0)


# --------------------------------------------------------------------------- Co-DINO (MMDetection 3.x port)
@pytest.fixture(scope="module")
def codino():
    d = reference_dir("co_dino_mmdet3_small")
    sd = load_int8exact_state_dict(d / "state_dict_int8exact.pt")
    inp = torch.load(d / "inputs.pt")
    enc = torch.load(d / "encoder_pyramid.pt")
    head = ATSSHead(ATSSHeadConfig(num_classes=80, hidden_dim=256, strides=[4, 8, 16, 32, 64, 128]), loss_scale=4.0)
    head.load_state_dict(official_atss_state_dict(sd), strict=True)
    head.eval()
    return dict(sd=sd, head=head, maps=[enc[f"aux_pyramid_{i}"] for i in range(6)],
                eval=torch.load(d / "atss_head_eval.pt"), assign=torch.load(d / "atss_assign_loss.pt"),
                internals=torch.load(d / "train_internals_seed2.pt")["aux_targets"][1],
                batch=_batch(inp["gt_bboxes_xyxy"], inp["gt_labels"]))


def test_codino_raw_outputs_and_predict(codino):
    head, ev = codino["head"], codino["eval"]
    pyr = _pyramid(codino["maps"], [4, 8, 16, 32, 64, 128])
    with torch.no_grad():
        cls, reg, ctr = head(pyr)
    for i in range(6):
        torch.testing.assert_close(cls[i], ev[f"cls_score_{i}"], atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(reg[i], ev[f"bbox_pred_{i}"], atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(ctr[i], ev[f"centerness_{i}"], atol=LOGIT_ATOL, rtol=0)
    det = head.predict(pyr, codino["batch"])[0]
    assert len(det) == 100
    # order-insensitive (README §6: near-tied scores may swap between thread counts, so sorting both lists
    # by score can pair two different detections): every detection must have its own official twin
    ours = list(zip(det.scores.tolist(), det.labels.tolist(), det.boxes.tolist()))
    theirs = list(zip(ev["pred_scores"].tolist(), ev["pred_labels"].tolist(), ev["pred_bboxes_xyxy"].tolist()))
    assert len(ours) == len(theirs)
    for s0, l0, b0 in ours:
        twin = next((j for j, (s1, l1, b1) in enumerate(theirs)
                     if l1 == l0 and abs(s0 - s1) < 1e-5 and max(abs(x - y) for x, y in zip(b0, b1)) < BOX_ATOL), None)
        assert twin is not None, f"no official detection matches ({s0:.6f}, label {l0}, {b0})"
        theirs.pop(twin)


def test_codino_assignment_and_losses(codino):
    head, ref = codino["head"], codino["assign"]
    pyr = _pyramid(codino["maps"], [4, 8, 16, 32, 64, 128])
    with torch.no_grad():
        outputs = head(pyr)
        tg = head.get_targets(pyr, codino["batch"])
        per_level = head.loss_per_level(outputs, tg)
    assert tg.num_per_level == ref["num_level_anchors"].tolist() == [5120, 1280, 320, 80, 20, 6]
    torch.testing.assert_close(tg.anchors, ref["anchors_xyxy"], atol=0, rtol=0)
    assert torch.equal(tg.labels[0], ref["labels"])
    assert torch.equal(tg.gt_index[0] + 1, ref["assign_gt_inds"])
    torch.testing.assert_close(tg.bbox_targets[0], ref["bbox_targets_xyxy"], atol=0, rtol=0)
    pos = ref["assign_gt_inds"] > 0
    torch.testing.assert_close(tg.max_iou[0][pos], ref["assign_max_overlaps"][pos], atol=1e-6, rtol=0)
    assert tg.num_pos == [33]
    assert torch.bincount(tg.gt_index[0][tg.gt_index[0] >= 0]).tolist() == [9, 9, 15]
    for name in ("loss_cls", "loss_bbox", "loss_centerness"):
        _close_loss(torch.stack(per_level[name]), ref[name])


def test_codino_positive_coords(codino):
    head, it = codino["head"], codino["internals"]
    pyr = _pyramid(codino["maps"], [4, 8, 16, 32, 64, 128])
    with torch.no_grad():
        pc = head.loss(pyr, codino["batch"]).positives
    pos = pc.labels[0] < 80
    assert int(pos.sum()) == it["coords_cxcywh"].shape[1] == 33
    torch.testing.assert_close(normalize_boxes(pc.ref_boxes_xyxy[0][pos], HW), it["coords_cxcywh"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize_boxes(pc.target_boxes_xyxy[0][pos], HW), it["targets_cxcywh"][0],
                               atol=1e-6, rtol=0)
    assert torch.equal(pc.labels[0][pos], it["labels"][0])
    torch.testing.assert_close(pc.feats[0][pos], it["feats"][0], atol=LOGIT_ATOL, rtol=0)


def test_codino_adapter_extra_level(codino):
    adapter = MultiScaleAdapter(256)
    adapter.load_state_dict({official_adapter_key_map(k): v for k, v in codino["sd"].items()
                             if official_adapter_key_map(k)}, strict=True)
    with torch.no_grad():
        pyr = adapter(codino["maps"][:5], None, [4, 8, 16, 32, 64])
    assert pyr.strides == [4, 8, 16, 32, 64, 128]
    torch.testing.assert_close(pyr.maps[5], codino["maps"][5], atol=LOGIT_ATOL, rtol=0)
