"""Parity of backbone + ChannelMapper + :class:`DINO` with MMDetection 3.3 ``DINO`` (``dino_mmdet3_small``).

The fixture (README there): ResNet-18 C3..C5 + ChannelMapper (4 levels), 2 encoder + 2 decoder layers, 100
queries, FFN 2048, PE temperature 20 / offset 0, 20 DN queries (6 groups for 3 GT) with noise scale 1e-30
(numerically zero noise; the same random numbers are drawn as with the config scales), focal loss weight 1.0 +
L1 5 + GIoU 2, class-specific encoder loss, ``sync_cls_avg_factor=True``, test top-300 without NMS. The
mmdet-3 ``DINOHead`` predicts boxes with ``inverse_sigmoid``'s default eps 1e-5 (``pred_ref_eps``).

Tolerances, as for the Deformable fixtures (README: 1 vs 2 threads <= 2.2e-6 on features and decoder outputs,
4.6e-5 px on boxes, 7.5e-8 on losses): 1e-4 on features / logits / logit-space coordinates, 1e-3 px on boxes,
integer outputs (top-k indices, labels) exactly equal, losses |ours - official| <= 1e-5 + 1e-5 |official|.
The references were computed with one intra-op thread, so the tests run with one thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from codetr.assigners.hungarian import HungarianAssignerConfig
from codetr.backbones.resnet import ResNet
from codetr.convert.mmdet3 import convert_mmdet3_dino
from codetr.core.detector import Detector
from codetr.core.interfaces import (EXTRAS_ENC_BOXES, EXTRAS_ENC_BOXES_UNACT_ALL, EXTRAS_ENC_LOGITS,
                                    EXTRAS_ENC_LOGITS_ALL, EXTRAS_ENC_PROPOSALS_UNACT, EXTRAS_TOPK_INDICES)
from codetr.core.structures import Batch, Target
from codetr.heads.criterion import SetCriterion, SetCriterionConfig
from codetr.necks.channel_mapper import ChannelMapper
from codetr.variants.dino import DINO, DINOConfig, build
from codetr.variants.postprocess import postprocess
from tests._reference import backbone_atol, boxes_px_report, close_report, load_int8exact_state_dict, reference_dir

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]  # fixtures made with 1 thread

NAME = "dino_mmdet3_small"
FEAT_ATOL = 1e-4
BOX_ATOL_PX = 1e-3
SCORE_ATOL = 1e-4
LOSS_TOL = 1e-5
H, W = 256, 320
PX = torch.tensor([W, H, W, H], dtype=torch.float32)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet(depth=18, out_indices=(2, 3, 4), frozen_stages=1, norm="frozen_bn")
        self.neck = ChannelMapper(self.backbone.out_channels, self.backbone.strides, 256, num_extra_levels=1)
        self.variant: DINO = build(DINOConfig(
            hidden_dim=256, num_queries=100, num_levels=4, num_classes=80, num_decoder_layers=2, num_encoder_layers=2,
            num_dn_queries=20, label_noise_scale=1e-30, box_noise_scale=1e-30, pred_ref_eps=1e-5))


@dataclass
class Run:
    feats: list[Tensor]
    levels: list[Tensor]
    memory: object
    group: object
    out: object


@pytest.fixture(scope="module")
def dino():
    root = reference_dir(NAME)
    sd = dict(load_int8exact_state_dict(root / "state_dict_int8exact_no_backbone.pt"))
    # README: the backbone weights are the Co-DINO fixture's (same keys, identical values)
    backbone = load_int8exact_state_dict(reference_dir("co_dino_mmdet3_small") / "state_dict_int8exact.pt")
    sd.update({k: v for k, v in backbone.items() if k.startswith("backbone.")})
    torch.manual_seed(0)
    model = _Model().eval()
    converted, report = convert_mmdet3_dino(sd, target_keys=model.state_dict().keys())
    model.load_state_dict(converted, strict=True)
    data = {name: torch.load(root / f"{name}.pt", weights_only=False)
            for name in ("inputs", "backbone_neck", "encoder", "decoder_outputs", "predictions")}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            feats = model.backbone(data["inputs"]["batch_inputs"])
            levels = model.neck(feats)
            masks = [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x in levels]
            memory = model.variant.encode(model.variant.prepare(levels, masks, model.neck.out_strides))
            group = model.variant.make_queries(memory, None)[0]
            out = model.variant.decode(group, memory)
    finally:
        torch.set_num_threads(n)
    return model, report, data, Run(feats, levels, memory, group, out)


def test_conversion_report(dino):
    _, report, _, _ = dino
    assert report.missing == [] and report.unmatched == {}
    assert len(report.matched) == 225 and all(k.endswith("num_batches_tracked") for k in report.ignored)
    keys = json.loads((reference_dir(NAME) / "state_dict_keys.json").read_text())
    assert len(report.matched) + len(report.ignored) == len(keys) == 245


def test_backbone_neck_features(dino):
    _, _, data, run = dino
    bn = data["backbone_neck"]
    r: dict[str, float] = {}
    for i, got in enumerate(run.feats):
        close_report(f"backbone[{i}]", got, bn[f"backbone_out_{i}"], backbone_atol(bn[f"backbone_out_{i}"]), r)
    for i, got in enumerate(run.levels):
        close_report(f"neck[{i}]", got, bn[f"neck_out_{i}"], FEAT_ATOL, r)
    print("dino backbone/neck parity (max abs diff):", r)


def test_encoder_memory_and_topk_proposals(dino):
    _, _, data, run = dino
    enc, dec = data["encoder"], data["decoder_outputs"]
    ex = run.memory.extras
    r: dict[str, float] = {}
    assert run.memory.inputs.spatial_shapes == [tuple(s) for s in enc["spatial_shapes"].tolist()]
    close_report("memory", run.memory.memory, enc["encoder_memory"], FEAT_ATOL, r)
    close_report("enc_logits_all", ex[EXTRAS_ENC_LOGITS_ALL], enc["enc_outputs_class"], FEAT_ATOL, r)
    close_report("enc_proposals_unact", ex[EXTRAS_ENC_PROPOSALS_UNACT], enc["output_proposals_unact"], FEAT_ATOL, r)
    close_report("enc_boxes_unact_all", ex[EXTRAS_ENC_BOXES_UNACT_ALL], enc["enc_outputs_coord_unact"], FEAT_ATOL, r)
    assert torch.equal(ex[EXTRAS_TOPK_INDICES], enc["topk_indices"])
    topk = enc["topk_indices"][0]
    close_report("enc_logits (top-k)", ex[EXTRAS_ENC_LOGITS][0], enc["enc_outputs_class"][0, topk], FEAT_ATOL, r)
    boxes_px_report(PX, "enc_boxes (top-k)", ex[EXTRAS_ENC_BOXES][0], enc["enc_outputs_coord_unact"][0, topk].sigmoid(), r)
    boxes_px_report(PX, "init_reference", run.group.reference, dec["decoder_init_reference_sigmoid"], r)
    close_report("query_in", run.group.content, dec["decoder_query_in"], FEAT_ATOL, r)
    print("dino encoder parity (max abs diff):", r)


def test_decoder_layers(dino):
    _, _, data, run = dino
    dec = data["decoder_outputs"]
    r: dict[str, float] = {}
    for layer in range(2):
        close_report(f"logits[{layer}]", run.out.logits[layer], dec["all_cls_scores"][layer], FEAT_ATOL, r)
        boxes_px_report(PX, f"boxes[{layer}]", run.out.boxes[layer], dec["all_bbox_preds"][layer], r)
        close_report(f"hidden[{layer}] (normed)", run.out.hidden[layer], dec["decoder_hidden_states"][layer], FEAT_ATOL, r)
        # references[l] = the reference layer l refines from: [initial, after layer 0]
        boxes_px_report(PX, f"references[{layer}]", run.out.references[layer], dec["decoder_references"][layer], r)
    print("dino decoder parity (max abs diff):", r)


def test_predictions_top300(dino):
    _, _, data, run = dino
    pred = data["predictions"]
    hw = torch.tensor([[H, W]])  # img_shape == ori_shape, scale factor 1
    det = postprocess(run.out, hw, hw, topk=300)[0]
    r: dict[str, float] = {}
    assert torch.equal(det.labels, pred["labels"])
    close_report("scores", det.scores, pred["scores"], SCORE_ATOL, r)
    close_report("bboxes_xyxy [px]", det.boxes, pred["bboxes_xyxy"], BOX_ATOL_PX, r)
    print("dino prediction parity (max abs diff):", r)


def _detector(model: _Model) -> Detector:
    crit = SetCriterion(SetCriterionConfig(cls_loss="focal", cls_weight=1.0, enc_loss="class", sync_cls_avg_factor=True,
                                           matcher=HungarianAssignerConfig(focal_eps=1e-12)))
    return Detector(model.backbone, model.neck, model.variant, crit, postprocess, num_classes=80)


def test_training_losses_zero_noise_dn(dino):
    """``Detector.loss`` (matching + DN queries decoded jointly, split, criterion / DN fixed-target losses)
    reproduces all 15 official losses; with zero noise they are seed independent (README)."""
    model, _, data, _ = dino
    inp = data["inputs"]
    det = _detector(model)
    batch = Batch(images=inp["batch_inputs"], masks=torch.zeros(1, H, W, dtype=torch.bool),
                  targets=[Target(inp["gt_bboxes_xyxy"].float(), inp["gt_labels"].long(),
                                  torch.zeros(len(inp["gt_labels"]), dtype=torch.bool))],
                  image_sizes=torch.tensor([[H, W]]), orig_sizes=torch.tensor([[H, W]]))
    ref = json.loads((reference_dir(NAME) / "train_losses_seed2.json").read_text())
    det.train()
    try:
        torch.manual_seed(2)
        losses = det.loss(batch)
        sum(losses.values()).backward()
        assert model.variant.denoising.label_embedding.weight.grad.abs().sum() > 0
        assert model.variant.box_heads[-1].layers[0].weight.grad is not None  # encoder head trained
    finally:
        det.zero_grad(set_to_none=True)
        det.eval()
    got = {k: float(v.detach()) for k, v in losses.items()}
    assert set(got) == set(ref["losses"])
    diff = {k: abs(got[k] - v) for k, v in ref["losses"].items()}
    print("dino train losses (abs diff):", diff)
    bad = {k: (got[k], v) for k, v in ref["losses"].items() if diff[k] > LOSS_TOL + LOSS_TOL * abs(v)}
    assert not bad, bad
    assert sum(got.values()) == pytest.approx(ref["total"], rel=LOSS_TOL, abs=LOSS_TOL)
