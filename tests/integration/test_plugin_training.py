"""The example plugin package end to end: ``codetr train`` with the SimOTA assigner in two assigner slots
(the Faster R-CNN RPN and the ATSS head), and aux heads evaluated on their own through ``eval_module``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from codetr.assembly import build_detector, load_recipe
from codetr.cli.main import app
from codetr.data.synth import make_synthetic

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "plugin_assigner" / "recipes" / "co_deformable_simota_tiny.yaml"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("simota_data")
    make_synthetic(root, 8, seed=3)
    return root


def _data_args(root: Path) -> list[str]:
    return [f"data.train.coco.ann_file={root}/annotations.json", f"data.train.coco.images_dir={root}/images",
            f"data.val.coco.ann_file={root}/annotations.json", f"data.val.coco.images_dir={root}/images"]


def test_codetr_train_with_simota_in_rpn_and_atss_slots(simota_installed, synth, tmp_path, monkeypatch):
    import codetr_simota

    calls: list[dict] = []
    assign = codetr_simota.SimOTAAssigner.assign

    def spy(self, anchors_xyxy, num_per_level, gt_boxes_xyxy, gt_labels, num_classes, pred_scores=None,
            pred_boxes_xyxy=None, ignore_boxes_xyxy=None):
        calls.append(dict(num_classes=num_classes, levels=None if num_per_level is None else len(num_per_level),
                          anchors=anchors_xyxy.shape[0],
                          scores=None if pred_scores is None else tuple(pred_scores.shape),
                          boxes=None if pred_boxes_xyxy is None else tuple(pred_boxes_xyxy.shape)))
        return assign(self, anchors_xyxy, num_per_level, gt_boxes_xyxy, gt_labels, num_classes, pred_scores,
                      pred_boxes_xyxy, ignore_boxes_xyxy)

    monkeypatch.setattr(codetr_simota.SimOTAAssigner, "assign", spy)
    out = tmp_path / "run"
    args = ["train", str(RECIPE), "--output-dir", str(out)]
    for a in _data_args(synth):
        args += ["--set", a]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output

    # both slots called the plugin with their own predictions: RPN class-agnostic (1 class, objectness),
    # ATSS with the 6 classes of the recipe; anchors level-major with per-level counts
    rpn = [c for c in calls if c["num_classes"] == 1]
    atss = [c for c in calls if c["num_classes"] == 6]
    assert rpn and atss and len(rpn) + len(atss) == len(calls)
    assert all(c["scores"] == (c["anchors"], 1) and c["boxes"] == (c["anchors"], 4) and c["levels"] == 4
               for c in rpn), rpn[:2]
    assert all(c["scores"] == (c["anchors"], 6) and c["boxes"] == (c["anchors"], 4) and c["levels"] == 4
               for c in atss), atss[:2]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert train and train[-1]["iteration"] == 4
    assert all(r["bad_steps"] == 0 for r in train), train  # every step finite and applied
    for key in ("aux0.loss_rpn_cls", "aux0.loss_rpn_bbox", "aux1.loss_cls", "aux1.loss_bbox",
                "aux1.loss_centerness", "loss_cls_aux0", "loss_cls_aux1"):
        assert all(key in r and torch.isfinite(torch.tensor(r[key])) for r in train), key
    assert all(r["aux1.loss_bbox"] > 0 for r in train)  # SimOTA found ATSS positives
    assert any(r["type"] == "eval" for r in records)
    assert (out / "checkpoints" / "model_final.pt").is_file()


def test_simota_fills_the_roi_slot(simota_installed):
    recipe = load_recipe(RECIPE, ["model.aux_heads.0.roi_assigner={type: simota, candidate_topk: 5}"],
                         read_data=False)
    head = build_detector(recipe.model).collaborative.heads[0]
    assert type(head.roi_assigner).__name__ == "SimOTAAssigner" and head.roi_assigner.cfg.candidate_topk == 5
    # a partial max_iou mapping still merges with the slot's own defaults
    recipe = load_recipe(RECIPE, ["model.aux_heads.0.roi_assigner={pos_iou_thr: 0.6}"], read_data=False)
    cfg = recipe.model.aux_heads[0].roi_assigner
    assert (cfg.type, cfg.pos_iou_thr, cfg.neg_iou_thr, cfg.match_low_quality) == ("max_iou", 0.6, 0.5, False)


def test_one_to_one_assigner_is_refused_in_a_one_to_many_slot(simota_installed):
    recipe = load_recipe(RECIPE, ["model.aux_heads.1.assigner={type: hungarian}"], read_data=False)
    with pytest.raises(ValueError, match=r"aux_heads\[atss\].assigner: 'hungarian' builds a HungarianAssigner"):
        build_detector(recipe.model)


@pytest.mark.parametrize("name, index", [("one-stage", 1), ("two-stage", 0), ("atss", 1), ("faster_rcnn", 0),
                                         ("rcnn", 0), ("aux1", 1), (0, 0), ("1", 1)])
def test_eval_module_selects_any_aux_head(simota_installed, name, index):
    recipe = load_recipe(RECIPE, read_data=False)
    model = build_detector(recipe.model)
    assert model.collaborative.head_index(name) == index


def test_eval_module_runs_the_chosen_head_and_rejects_unknown(simota_installed):
    recipe = load_recipe(RECIPE, ["model.co_detr.eval_module=aux1", "model.test.exact_padding=false"],
                         read_data=False)
    torch.manual_seed(0)
    model = build_detector(recipe.model).eval()
    from codetr.core.structures import Batch
    batch = Batch(images=torch.randn(1, 3, 96, 128), masks=torch.zeros(1, 96, 128, dtype=torch.bool),
                  targets=[], image_sizes=torch.tensor([[96, 128]]), orig_sizes=torch.tensor([[192, 256]]),
                  image_ids=[1])
    dets = model.predict(batch)
    assert len(dets) == 1 and dets[0].boxes.shape[1] == 4 and len(dets[0]) <= recipe.model.aux_heads[1].max_per_img
    with pytest.raises(ValueError, match="names no aux head.*choose"):
        build_detector(load_recipe(RECIPE, ["model.co_detr.eval_module=aux7"], read_data=False).model)
    with pytest.raises(ValueError, match="model.aux_heads is empty"):
        build_detector(load_recipe(REPO / "recipes" / "tests" / "tiny.yaml", ["model.co_detr.eval_module=atss"],
                                   read_data=False).model)
