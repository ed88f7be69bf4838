"""``codetr convert`` on the official Sense-X fixture checkpoint and ``codetr export-weights --inference-only``."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from codetr.cli.main import app
from codetr.assembly import build_detector
from codetr.assembly import load_recipe
from codetr.engine.checkpoint import extract_state_dict, load_checkpoint
from tests._reference import load_safetensors_state_dict, reference_dir

from .test_co_deformable_parity import RECIPE, _one

runner = CliRunner()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = reference_dir("co_deformable_detr_official_small")
    tmp = tmp_path_factory.mktemp("convert")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    official = tmp / "official.pth"
    torch.save({"state_dict": dict(load_safetensors_state_dict(root / "state_dict.safetensors")),
                "meta": {"note": "test"}}, official)
    out = tmp / "codetr.pt"
    res = runner.invoke(app, ["convert", str(recipe), str(official), "--out", str(out), "--format", "sense-x"])
    assert res.exit_code == 0, res.output
    assert "converted" in res.output
    return root, recipe, out, tmp


def _predict(recipe_path, sd, root):
    torch.set_num_threads(1)
    recipe = load_recipe(recipe_path, read_data=False)
    model = build_detector(recipe.model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected
    model.eval()
    inputs = torch.load(root / "inputs.pt", weights_only=False)
    from codetr.core.structures import Batch, Target

    img = inputs["img"]
    batch = Batch(images=img, masks=torch.zeros(1, *img.shape[-2:], dtype=torch.bool),
                  targets=[Target(_one(inputs["gt_bboxes"]).float(), _one(inputs["gt_labels"]).long(),
                                  torch.zeros(3, dtype=torch.bool))],
                  image_sizes=torch.tensor([[256, 320]]), orig_sizes=torch.tensor([[512, 512]]), image_ids=[1])
    return model.predict(batch)[0], missing


@pytest.mark.parity
def test_convert_then_predict_matches_official(converted):
    root, recipe, out, _ = converted
    det, missing = _predict(recipe, extract_state_dict(load_checkpoint(out)), root)
    assert [k for k in missing if not k.endswith("num_batches_tracked")] == []
    pred = torch.load(root / "predictions.pt", weights_only=False)
    assert torch.equal(det.labels, pred["labels"].long())
    torch.testing.assert_close(det.boxes, pred["bboxes_rescaled_to_original"].float(), atol=1e-3, rtol=0)


@pytest.mark.parity
def test_export_inference_only_drops_aux_and_predicts_the_same(converted):
    root, recipe, out, tmp = converted
    slim = tmp / "slim.pt"
    res = runner.invoke(app, ["export-weights", str(out), "--out", str(slim), "--inference-only"])
    assert res.exit_code == 0, res.output
    full_sd = extract_state_dict(load_checkpoint(out))
    slim_sd = extract_state_dict(load_checkpoint(slim))
    assert not any(k.startswith("collaborative.") for k in slim_sd)
    assert any(k.startswith("collaborative.") for k in full_sd)
    det_full, _ = _predict(recipe, full_sd, root)
    det_slim, missing = _predict(recipe, slim_sd, root)
    assert all(k.startswith("collaborative.") or k.endswith("num_batches_tracked") for k in missing)
    torch.testing.assert_close(det_slim.boxes, det_full.boxes, atol=0, rtol=0)


def test_convert_errors_are_readable(tmp_path):
    res = runner.invoke(app, ["convert", "recipes/co_deformable_detr_r50.yaml", str(tmp_path / "nope.pth"),
                              "--out", str(tmp_path / "x.pt")])
    assert res.exit_code == 1 and "checkpoint not found" in res.output
    res = runner.invoke(app, ["convert", "recipes/co_deformable_detr_r50.yaml", str(tmp_path / "nope.pth"),
                              "--out", str(tmp_path / "x.pt"), "--format", "caffe"])
    assert res.exit_code == 1 and "--format must be one of" in res.output
