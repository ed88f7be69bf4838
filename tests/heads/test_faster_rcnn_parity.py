"""Faster R-CNN aux head vs the official Co-DETR code (fixtures in ``shared/reference-outputs``).

* ``co_deformable_detr_official_small`` (Sense-X/Co-DETR, MMDetection 2.25.3): RPN raw outputs, anchors,
  training proposals, RoI positives of ``aux_queries.pt['roi_group_seed2']`` and the training losses of
  ``train_losses.json``. The official ``forward_train`` draws nothing from the global RNG before the RPN
  sampler, so ``torch.manual_seed(s)`` right before :meth:`FasterRCNNHead.loss` reproduces even the
  seed-dependent ``loss_rpn_cls`` / ``loss_cls0`` / ``acc0`` of seeds 2-5.
* ``co_dino_mmdet3_small`` (MMDetection 3.x port): RPN raw outputs, test proposals, RoI-head predictions
  (``rpn_roi_eval.pt``), the positive samples of the seed-2 training step and its deterministic losses;
  its DN query generator draws random numbers before the RPN, so the random negatives are injected from
  ``train_internals_seed2.pt`` to check ``loss_rpn_cls`` / ``loss_cls0``.

Loss-weight convention of both fixtures: base weight x (num_dec_layer 2 x lambda_2 2.0) = ``loss_scale`` 4.
"""

from __future__ import annotations

import json

import pytest
import torch

from codetr.core.interfaces import FeaturePyramid
from codetr.core.structures import Batch, Target, xyxy_to_cxcywh
from codetr.heads.faster_rcnn import (
    FasterRCNNHead,
    FasterRCNNHeadConfig,
    convert_official_faster_rcnn_state_dict,
)
from tests._reference import load_int8exact_state_dict, load_safetensors_state_dict, reference_dir

pytestmark = pytest.mark.parity

LOSS_SCALE = 4.0
BOX_TOL = 1.1e-4      # px, README "RPN proposals" thread-to-thread difference
LOSS_RTOL = 1e-5


def _pyramid(maps: list[torch.Tensor], strides: list[int]) -> FeaturePyramid:
    masks = [torch.zeros(m.shape[0], m.shape[2], m.shape[3], dtype=torch.bool) for m in maps]
    return FeaturePyramid(maps=list(maps), strides=strides, masks=masks)


def _batch(img: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, orig_hw: tuple[int, int]) -> Batch:
    h, w = img.shape[-2:]
    return Batch(images=img, masks=torch.zeros(1, h, w, dtype=torch.bool),
                 targets=[Target(boxes.float(), labels.long(), torch.zeros(len(labels), dtype=torch.bool))],
                 image_sizes=torch.tensor([[h, w]]), orig_sizes=torch.tensor([orig_hw]), image_ids=[0])


# --------------------------------------------------------------------------- Co-Deformable-DETR (mmdet 2)
@pytest.fixture(scope="module")
def codef():
    d = reference_dir("co_deformable_detr_official_small")
    sd = load_safetensors_state_dict(d / "state_dict.safetensors")
    cfg = FasterRCNNHeadConfig(num_classes=80, hidden_dim=256, fc_out_channels=128, finest_scale=112)
    head = FasterRCNNHead(cfg, loss_scale=LOSS_SCALE)
    head.load_state_dict(convert_official_faster_rcnn_state_dict(sd), strict=True)
    head.train()
    inputs = torch.load(d / "inputs.pt")
    feats = torch.load(d / "features.pt")["aux_pyramid"]
    return {
        "head": head,
        "pyramid": _pyramid(feats, [8, 16, 32, 64, 128]),
        "batch": _batch(inputs["img"], inputs["gt_bboxes"], inputs["gt_labels"], (512, 512)),
        "rpn": torch.load(d / "rpn.pt"),
        "aux": torch.load(d / "aux_queries.pt"),
        "losses": json.loads((d / "train_losses.json").read_text()),
    }


def test_codef_state_dict_keys_map_one_to_one(codef):
    d = reference_dir("co_deformable_detr_official_small")
    shapes = json.loads((d / "state_dict_shapes.json").read_text())
    official = {k for k in shapes if k.startswith(("rpn_head.", "roi_head."))}
    ours = set(codef["head"].state_dict())
    assert len(official) == len(ours) == 14
    assert set(convert_official_faster_rcnn_state_dict({k: torch.zeros(1) for k in official})) == ours


def test_codef_rpn_raw_outputs_and_anchors(codef):
    head, rpn = codef["head"], codef["rpn"]
    with torch.no_grad():
        cls, reg = head.rpn_head(codef["pyramid"].maps)
    for ours, ref in zip(cls, rpn["cls_scores"], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for ours, ref in zip(reg, rpn["bbox_preds"], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    anchors = head.anchors(codef["pyramid"])
    assert [a.shape[0] for a in anchors] == [11520, 2880, 720, 180, 54]
    for ours, ref in zip(anchors, rpn["anchors_per_level"], strict=True):
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_codef_train_proposals(codef):
    head, rpn = codef["head"], codef["rpn"]
    anchors = head.anchors(codef["pyramid"])
    # from the stored raw outputs: the post-processing alone
    props = head.proposals(rpn["cls_scores"], rpn["bbox_preds"], anchors, codef["batch"], train=True)[0]
    ref = rpn["proposals_train_cfg"]
    assert props.shape == ref.shape == (1000, 5)
    torch.testing.assert_close(props, ref, atol=BOX_TOL, rtol=0)
    # end to end from the features
    with torch.no_grad():
        cls, reg = head.rpn_head(codef["pyramid"].maps)
    props = head.proposals(cls, reg, anchors, codef["batch"], train=True)[0]
    torch.testing.assert_close(props, ref, atol=BOX_TOL, rtol=0)


@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_codef_losses_match_official_seed(codef, seed):
    """Deterministic keys to float precision, and the seed-dependent ones exactly per seed."""
    head = codef["head"]
    ref = codef["losses"][f"seed{seed}"]
    torch.manual_seed(seed)
    out = head.loss(codef["pyramid"], codef["batch"])
    assert set(out.losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"}
    got = {k: v.item() for k, v in out.losses.items()}
    # deterministic across seeds
    assert got["loss_rpn_bbox"] == pytest.approx(sum(ref["loss_rpn_bbox"]), rel=LOSS_RTOL, abs=1e-7)
    assert got["loss_bbox"] == pytest.approx(ref["loss_bbox0"], rel=LOSS_RTOL)
    torch.testing.assert_close(head.metrics["loss_rpn_bbox_levels"], torch.tensor(ref["loss_rpn_bbox"]),
                               atol=1e-7, rtol=LOSS_RTOL)
    # seed dependent: official range first, then the exact official value (same RNG consumption)
    assert 15.234 - 1e-3 <= got["loss_cls"] <= 15.259 + 1e-3
    assert got["loss_cls"] == pytest.approx(ref["loss_cls0"], rel=LOSS_RTOL)
    assert got["loss_rpn_cls"] == pytest.approx(sum(ref["loss_rpn_cls"]), rel=LOSS_RTOL)
    torch.testing.assert_close(head.metrics["loss_rpn_cls_levels"], torch.tensor(ref["loss_rpn_cls"]),
                               atol=1e-7, rtol=LOSS_RTOL)
    assert head.metrics["acc"].item() == pytest.approx(ref["acc0"], abs=1e-4)


def test_codef_roi_positive_coords_seed2(codef):
    head, ref = codef["head"], codef["aux"]["roi_group_seed2"]
    torch.manual_seed(2)
    out = head.loss(codef["pyramid"], codef["batch"])
    pc = out.positives
    assert pc.tag == "rcnn" and len(pc.ref_boxes_xyxy) == 1
    n = pc.ref_boxes_xyxy[0].shape[0]
    assert n == 512 and pc.labels[0].shape == (n,) and pc.target_boxes_xyxy[0].shape == (n, 4)
    assert pc.feats[0].shape == (n, 256)
    pos = pc.labels[0] < 80
    assert int(pos.sum()) == 9 and bool(pos[:9].all())           # positives first, GT boxes first of all
    scale = torch.tensor([320.0, 256.0, 320.0, 256.0])
    coords = xyxy_to_cxcywh(pc.ref_boxes_xyxy[0][:9] / scale)
    targets = xyxy_to_cxcywh(pc.target_boxes_xyxy[0][:9] / scale)
    torch.testing.assert_close(coords, ref["aux_coords"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(targets, ref["aux_targets"][0], atol=1e-6, rtol=0)
    assert pc.labels[0][:9].tolist() == ref["aux_labels"][0].tolist()
    torch.testing.assert_close(pc.ref_boxes_xyxy[0][:3], codef["batch"].targets[0].boxes)
    assert bool((pc.target_boxes_xyxy[0][9:] == 0).all()) and bool((pc.labels[0][9:] == 80).all())
    # feats: the 7x7 RoIAlign features (finest_scale 112 level mapping) mean-pooled over space
    assert torch.isfinite(pc.feats[0]).all()
    rois = torch.cat([torch.zeros(n, 1), pc.ref_boxes_xyxy[0]], 1)
    with torch.no_grad():
        roi_feats, _, _ = head.roi_forward(codef["pyramid"], rois)
    torch.testing.assert_close(pc.feats[0], roi_feats.mean((-1, -2)), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- Co-DINO (mmdet 3 port)
@pytest.fixture(scope="module")
def codino():
    d = reference_dir("co_dino_mmdet3_small")
    sd = load_int8exact_state_dict(d / "state_dict_int8exact.pt")
    cfg = FasterRCNNHeadConfig(num_classes=80, hidden_dim=256)   # fc 1024, finest_scale 56 (defaults)
    head = FasterRCNNHead(cfg, loss_scale=LOSS_SCALE)
    head.load_state_dict(convert_official_faster_rcnn_state_dict(sd), strict=True)
    inputs = torch.load(d / "inputs.pt")
    pyr = torch.load(d / "encoder_pyramid.pt")
    return {
        "head": head,
        "pyramid": _pyramid([pyr[f"aux_pyramid_{i}"] for i in range(6)], [4, 8, 16, 32, 64, 128]),
        "batch": _batch(inputs["batch_inputs"], inputs["gt_bboxes_xyxy"], inputs["gt_labels"], (256, 320)),
        "eval": torch.load(d / "rpn_roi_eval.pt"),
        "internals": torch.load(d / "train_internals_seed2.pt"),
        "losses": json.loads((d / "train_losses_seed2.json").read_text())["losses"],
    }


def test_codino_rpn_and_roi_predictions(codino):
    head, ev = codino["head"], codino["eval"]
    cls_ref = [ev[f"rpn_cls_score_{i}"] for i in range(6)]
    reg_ref = [ev[f"rpn_bbox_pred_{i}"] for i in range(6)]
    with torch.no_grad():
        cls, reg = head.rpn_head(codino["pyramid"].maps)
    for a, b in zip(cls + reg, cls_ref + reg_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    anchors = head.anchors(codino["pyramid"])
    props = head.proposals(cls_ref, reg_ref, anchors, codino["batch"], train=False)[0]
    torch.testing.assert_close(props[:, :4], ev["proposals_xyxy"], atol=BOX_TOL, rtol=0)
    torch.testing.assert_close(props[:, 4], ev["proposal_scores"], atol=1e-6, rtol=0)
    # RoI head on the official proposals
    ref_props = torch.cat([ev["proposals_xyxy"], ev["proposal_scores"][:, None]], 1)
    det = head.predict_from_proposals(codino["pyramid"], codino["batch"], [ref_props])[0]
    torch.testing.assert_close(det.boxes, ev["roi_pred_bboxes_xyxy"], atol=1e-3, rtol=0)
    torch.testing.assert_close(det.scores, ev["roi_pred_scores"], atol=1e-5, rtol=0)
    assert det.labels.tolist() == ev["roi_pred_labels"].tolist()
    # full two-stage predict from the features
    det = head.predict(codino["pyramid"], codino["batch"])[0]
    assert len(det) == 100
    torch.testing.assert_close(det.boxes, ev["roi_pred_bboxes_xyxy"], atol=1e-3, rtol=0)
    assert det.labels.tolist() == ev["roi_pred_labels"].tolist()


def _assert_same_rows(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> None:
    """Same boxes in the same order, except that near-tied proposals may swap places (README §6: the RPN
    proposal order between near-tied scores depends on the CPU / thread count): every row that differs from
    its official counterpart must equal another official row that is not matched otherwise."""
    assert ours.shape == theirs.shape
    off = ((ours - theirs).abs().amax(1) > tol).nonzero().flatten().tolist()
    free = list(off)
    for i in off:
        j = next((j for j in free if (ours[i] - theirs[j]).abs().max() <= tol), None)
        assert j is not None, f"sampled box {i} {ours[i].tolist()} is not among the official samples"
        free.remove(j)


def test_codino_training_samples_and_losses(codino, monkeypatch):
    head, ti, ref = codino["head"], codino["internals"], codino["losses"]
    rpn_neg, roi_neg = ti["rpn_sampling"]["neg_inds"], ti["rcnn_sampling"]["neg_inds"]
    # inject the official random negatives (its DN generator consumed the RNG before the RPN sampler)
    monkeypatch.setattr(head.rpn_sampler, "random_choice", lambda gallery, num, generator=None: rpn_neg.clone())
    monkeypatch.setattr(head.roi_sampler, "random_choice", lambda gallery, num, generator=None: roi_neg.clone())
    head.record_internals = True
    try:
        out = head.loss(codino["pyramid"], codino["batch"])
        rpn_s, roi_s = head.internals["rpn_sampling"][0], head.internals["roi_sampling"][0]
    finally:
        head.record_internals = False
    assert rpn_s.pos_inds.tolist() == ti["rpn_sampling"]["pos_inds"].tolist()
    assert roi_s.pos_inds.tolist() == ti["rcnn_sampling"]["pos_inds"].tolist()
    assert roi_s.pos_labels.tolist() == ti["rcnn_sampling"]["pos_gt_labels"].tolist()
    assert roi_s.pos_assigned_gt_inds.tolist() == ti["rcnn_sampling"]["pos_assigned_gt_inds"].tolist()
    _assert_same_rows(roi_s.boxes, ti["rcnn_sampling"]["priors_xyxy"], BOX_TOL)
    got = {k: v.item() for k, v in out.losses.items()}
    # eval-mode pyramid vs the train-mode run: ~1e-6 feature differences -> small loss tolerance
    assert got["loss_rpn_bbox"] == pytest.approx(sum(ref["loss_rpn_bbox"]), rel=1e-4)
    assert got["loss_bbox"] == pytest.approx(ref["loss_bbox0"], rel=1e-4)
    assert got["loss_rpn_cls"] == pytest.approx(sum(ref["loss_rpn_cls"]), rel=1e-4)
    assert got["loss_cls"] == pytest.approx(ref["loss_cls0"], rel=1e-4)
    torch.testing.assert_close(head.metrics["loss_rpn_cls_levels"], torch.tensor(ref["loss_rpn_cls"]),
                               atol=1e-5, rtol=1e-4)
    assert head.metrics["acc"].item() == pytest.approx(ref["acc0"], abs=1e-4)
    pc = out.positives
    assert pc.ref_boxes_xyxy[0].shape == (512, 4) and int((pc.labels[0] < 80).sum()) == 7


def test_codef_roi_group_through_positive_query_selection(codef):
    """Head output -> ``select_positive_queries`` == the official ``get_aux_targets`` group (P = 9)."""
    pq = pytest.importorskip("codetr.heads.positive_queries")
    ref = codef["aux"]["roi_group_seed2"]
    torch.manual_seed(2)
    out = codef["head"].loss(codef["pyramid"], codef["batch"])
    sel = pq.select_positive_queries(out.positives, codef["batch"].image_sizes, 80)
    torch.testing.assert_close(sel.reference, ref["aux_coords"], atol=1e-6, rtol=0)
    assert sel.targets.labels.tolist() == ref["aux_labels"].tolist()
    torch.testing.assert_close(sel.targets.boxes, ref["aux_targets"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sel.targets.label_weights, ref["aux_label_weights"])
    assert sel.feats.shape == (1, 9, 256)
