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


# --------------------------------------------------------------------------- --format hf
def _hf_case(kind: str):
    """A small random HF model of ``kind`` and the recipe ``model`` section that reproduces it."""
    transformers = pytest.importorskip("transformers")
    from transformers import ResNetConfig

    from codetr.convert.hf import hf_recipe_model
    from codetr.convert.hf_single_scale import hf_conditional_recipe_model, hf_dab_recipe_model

    out = ["stage2", "stage3", "stage4"] if kind == "deformable_detr" else ["stage4"]
    backbone = ResNetConfig(out_features=out, depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic")
    common = dict(backbone_config=backbone, num_labels=5, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, num_queries=12)
    if kind == "deformable_detr":
        cfg = transformers.DeformableDetrConfig(**common, d_model=64, with_box_refine=True, two_stage=True,
                                                two_stage_num_proposals=12)
        return transformers.DeformableDetrForObjectDetection(cfg), hf_recipe_model(cfg)
    if kind == "conditional_detr":
        cfg = transformers.ConditionalDetrConfig(**common, d_model=64)
        return transformers.ConditionalDetrForObjectDetection(cfg), hf_conditional_recipe_model(cfg)
    cfg = transformers.DabDetrConfig(**common, hidden_size=64)
    return transformers.DabDetrForObjectDetection(cfg), hf_dab_recipe_model(cfg)


@pytest.mark.parametrize("kind", ["deformable_detr", "conditional_detr", "dab_detr"])
def test_convert_hf_saved_pretrained(kind, tmp_path):
    """``codetr convert --format hf`` on an HF ``save_pretrained`` model (its ``model.safetensors``, tied copies
    dropped by HF): the written checkpoint loads strictly and reproduces HF's outputs."""
    torch.manual_seed(0)
    hf, model_section = _hf_case(kind)
    hf = hf.eval()
    with torch.no_grad():  # non-trivial heads (HF zero-initialises some biases)
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": f"hf_{kind}", "model": model_section, "schedule": {"epochs": 1}}))
    out = tmp_path / "codetr.pt"
    res = runner.invoke(app, ["convert", str(recipe), str(tmp_path / "hf" / "model.safetensors"), "--out", str(out),
                              "--format", "hf"])
    assert res.exit_code == 0, res.output
    model = build_detector(load_recipe(recipe, read_data=False).model).eval()
    model.load_state_dict(extract_state_dict(load_checkpoint(out)), strict=True)
    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(pixel_values=images, pixel_mask=torch.ones(1, 96, 128, dtype=torch.long))
        from codetr.core.structures import Batch

        batch = Batch(images=images, masks=torch.zeros(1, 96, 128, dtype=torch.bool), targets=[],
                      image_sizes=torch.tensor([[96, 128]]), orig_sizes=torch.tensor([[96, 128]]), image_ids=[0])
        memory = model.encode(batch)
        got = model.variant.decode(model.variant.make_queries(memory, None)[0], memory)
    torch.testing.assert_close(got.logits[-1], want.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], want.pred_boxes, atol=1e-4, rtol=0)
    # the save_pretrained directory itself works too
    res = runner.invoke(app, ["convert", str(recipe), str(tmp_path / "hf"), "--out", str(tmp_path / "dir.pt"),
                              "--format", "hf"])
    assert res.exit_code == 0, res.output


def test_convert_hf_errors_are_readable(tmp_path):
    res = runner.invoke(app, ["convert", "recipes/dino_r50.yaml", str(tmp_path), "--out", str(tmp_path / "x.pt"),
                              "--format", "hf"])
    assert res.exit_code == 1 and "no HF transformers model is known for variant 'dino'" in res.output
    res = runner.invoke(app, ["convert", "recipes/conditional_detr_r50.yaml", str(tmp_path), "--out",
                              str(tmp_path / "x.pt"), "--format", "hf"])
    assert res.exit_code == 1 and "no model.safetensors" in res.output
    (tmp_path / "model.safetensors").write_bytes(b"")
    res = runner.invoke(app, ["convert", "recipes/conditional_detr_r50.yaml", str(tmp_path), "--out",
                              str(tmp_path / "x.pt"), "--format", "hf"])
    assert res.exit_code == 1 and "not a readable safetensors file" in res.output
