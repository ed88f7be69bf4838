"""End-to-end parity with the official Sense-X Co-Deformable-DETR (K = 2: Faster R-CNN head 0, ATSS head 1).

The whole detector is built from a recipe, loaded through ``convert_sense_x_co_detr`` with ``strict=True``,
and ``Detector.loss`` on the fixture image must reproduce every official training loss (one-to-one,
RPN, RoI, ATSS and both customized-positive-query groups) for the same seed, and ``Detector.predict`` the
official predictions. Tolerances: co_deformable_detr_official_small/README.md ("Observed tolerances").
"""

from __future__ import annotations

import json

import pytest
import torch

from codetr.convert.co_detr import convert_sense_x_co_detr
from codetr.assembly import build_detector
from codetr.assembly import load_recipe_dict
from codetr.core.structures import Batch, Target
from tests._reference import load_safetensors_state_dict, reference_dir

NAME = "co_deformable_detr_official_small"

RECIPE = {
    "name": "co_deformable_small_parity",
    "model": {
        "num_classes": 80, "hidden_dim": 256, "num_levels": 4, "num_queries": 100, "num_decoder_layers": 2,
        "backbone": {"type": "resnet", "depth": 18, "out_indices": [2, 3, 4], "frozen_stages": 1, "norm": "frozen_bn"},
        "neck": {"type": "channel_mapper", "num_extra_levels": 1},
        "variant": {"type": "deformable_detr", "preset": "deformable_detr_pp", "num_encoder_layers": 2},
        "criterion": {"matcher": {"type": "hungarian", "focal_eps": 1e-12}},
        "aux_heads": [
            {"type": "faster_rcnn", "finest_scale": 112, "fc_out_channels": 128},
            {"type": "atss"},
        ],
        "query_encoder": {"type": "positive_queries", "flavour": "deformable", "head_pos_embed": "scalar"},
        "co_detr": {"lambda_1": 1.0, "lambda_2": 2.0},
        "test": {"topk": 100},
    },
    "schedule": {"epochs": 1},
}

# official key -> ours (official RPN / ATSS losses are per level: we report their sum)
KEY_MAP = {
    "loss_rpn_cls": "aux0.loss_rpn_cls", "loss_rpn_bbox": "aux0.loss_rpn_bbox",
    "loss_cls0": "aux0.loss_cls", "loss_bbox0": "aux0.loss_bbox",
    "loss_cls1": "aux1.loss_cls", "loss_bbox1": "aux1.loss_bbox", "loss_centerness1": "aux1.loss_centerness",
}


@pytest.fixture(scope="module")
def setup():
    root = reference_dir(NAME)
    torch.set_num_threads(1)
    recipe = load_recipe_dict(RECIPE, read_data=False)
    model = build_detector(recipe.model)
    sd, report = convert_sense_x_co_detr(load_safetensors_state_dict(root / "state_dict.safetensors"),
                                         [h.type for h in recipe.model.aux_heads],
                                         target_keys=model.state_dict().keys())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert [k for k in missing if not k.endswith("num_batches_tracked")] == [], missing
    inputs = torch.load(root / "inputs.pt", weights_only=False)
    img = inputs["img"]
    batch = Batch(
        images=img, masks=torch.zeros(1, *img.shape[-2:], dtype=torch.bool),
        targets=[Target(boxes=_one(inputs["gt_bboxes"]).float(), labels=_one(inputs["gt_labels"]).long(),
                        iscrowd=torch.zeros(len(_one(inputs["gt_labels"])), dtype=torch.bool))],
        image_sizes=torch.tensor([[256, 320]]), orig_sizes=torch.tensor([[512, 512]]), image_ids=[1])
    losses_ref = json.loads((root / "train_losses.json").read_text())
    return root, model, batch, losses_ref


def _official(value):
    return sum(value) if isinstance(value, list) else value


@pytest.mark.parity
@pytest.mark.parametrize("seed", [2, 3])
def test_training_losses_match_official(setup, seed):
    _, model, batch, ref = setup
    model.train()
    torch.manual_seed(seed)
    ours = {k: float(v.detach()) for k, v in model.loss(batch).items()}
    expected = {KEY_MAP.get(k, k): _official(v) for k, v in ref[f"seed{seed}"].items() if k != "acc0"}
    assert set(ours) == set(expected), (set(ours) ^ set(expected))
    bad = {k: (ours[k], v) for k, v in expected.items() if abs(ours[k] - v) > 1e-5 + 1e-5 * abs(v)}
    assert not bad, bad
    total = sum(ours.values())
    assert total == pytest.approx(ref[f"total_seed{seed}"], rel=1e-5, abs=1e-5)


@pytest.mark.parity
def test_predictions_match_official(setup):
    root, model, batch, _ = setup
    model.eval()
    pred = torch.load(root / "predictions.pt", weights_only=False)
    det = model.predict(batch)[0]
    assert torch.equal(det.labels, pred["labels"].long())
    torch.testing.assert_close(det.scores, pred["scores"].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(det.boxes, pred["bboxes_rescaled_to_original"].float(), atol=1e-3, rtol=0)


def _one(x):
    """The fixture stores per-image lists or a single tensor."""
    return x[0] if isinstance(x, (list, tuple)) else x
