"""``codetr convert`` for Co-DINO in both official layouts and with Swin backbones.

* Sense-X Co-DETR (MMDetection 2.x) and the MMDetection 3.x ``projects/CO-DETR`` port share the Co-DINO key
  layout except for the DN label embedding (``query_head.label_embedding`` vs
  ``query_head.dn_generator.label_embedding``) and the Swin names (official ``SwinTransformerV1``
  ``layers.*`` vs mmdet ``stages.*`` with ``nn.Unfold``-ordered patch merging). The fixture checkpoint
  (``co_dino_mmdet3_small``) is rewritten into the Sense-X layout and must convert to the same tensors.
* A Co-DINO with a (small) Swin backbone is written out in each official layout -- non-backbone names taken
  from the fixture conversion, backbone names official or mmdet -- and ``codetr convert`` must give back
  exactly the model's tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from typer.testing import CliRunner

from codetr.cli.main import app
from codetr.convert.mmdet3 import convert_mmdet3_co_dino
from codetr.assembly import build_detector
from codetr.assembly import load_recipe_dict
from codetr.engine.checkpoint import extract_state_dict, load_checkpoint
from tests._reference import load_int8exact_state_dict, reference_dir
from tests.backbones.test_swin import _official_to_mmdet

from .test_co_dino_parity import NAME, RECIPE

pytestmark = pytest.mark.parity
runner = CliRunner()
MM3_LABEL = "query_head.dn_generator.label_embedding.weight"
SENSE_X_LABEL = "query_head.label_embedding.weight"
SWIN = {"type": "swin", "embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "window_size": 7,
        "out_indices": [1, 2, 3, 4], "frozen_stages": -1, "drop_path_rate": 0.0}


@pytest.fixture(scope="module")
def fixture_conversion():
    """(official mmdet-3 state dict, codetr state dict, codetr key -> official key) of the fixture."""
    official = load_int8exact_state_dict(reference_dir(NAME) / "state_dict_int8exact.pt")
    recipe = load_recipe_dict(RECIPE, read_data=False)
    ours, report = convert_mmdet3_co_dino(official, [h.type for h in recipe.model.aux_heads])
    return official, ours, {dst: src for src, dst in report.matched}


def _convert(tmp_path, recipe: dict, official: dict, fmt: str) -> dict:
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    torch.save({"state_dict": official, "meta": {"fmt": fmt}}, tmp_path / "official.pth")
    out = tmp_path / "codetr.pt"
    res = runner.invoke(app, ["convert", str(tmp_path / "recipe.yaml"), str(tmp_path / "official.pth"),
                              "--out", str(out), "--format", fmt])
    assert res.exit_code == 0, res.output
    return extract_state_dict(load_checkpoint(out))


def test_sense_x_co_dino_layout_converts_like_mmdet3(tmp_path, fixture_conversion):
    official, ours, _ = fixture_conversion
    sense_x = {(SENSE_X_LABEL if k == MM3_LABEL else k): v for k, v in official.items()}
    assert SENSE_X_LABEL in sense_x and MM3_LABEL not in sense_x
    converted = _convert(tmp_path, RECIPE, sense_x, "sense-x")
    assert set(ours) <= set(converted)
    for key, value in ours.items():
        assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("layout", ["sense-x", "mmdet3"])
def test_swin_co_dino_round_trip(tmp_path, fixture_conversion, layout):
    _, _, to_official = fixture_conversion
    recipe = copy.deepcopy(RECIPE)
    recipe["model"]["backbone"] = dict(SWIN)
    torch.manual_seed(0)
    model = build_detector(load_recipe_dict(recipe, read_data=False).model)
    with torch.no_grad():  # make every tensor distinct from its initialisation pattern
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    sd = model.state_dict()
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    # the official files also store the derived index buffers; they must be ignored, not reported as unmatched
    for s, d in enumerate(SWIN["depths"]):
        for b in range(d):
            backbone[f"layers.{s}.blocks.{b}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    if layout == "sense-x":
        official = {"backbone." + k: v for k, v in backbone.items()}
    else:
        official = _official_to_mmdet(backbone)
        assert any(".w_msa." in k for k in official) and any(k.startswith("backbone.stages.") for k in official)
    for key, value in sd.items():
        if key.startswith("backbone."):
            continue
        src = to_official[key]
        official[SENSE_X_LABEL if (layout == "sense-x" and src == MM3_LABEL) else src] = value
    converted = _convert(tmp_path, recipe, official, layout)
    for key, value in sd.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(converted[key], value), key


def test_k0_dino_recipe_from_co_dino_checkpoint_needs_allow_unmatched(tmp_path, fixture_conversion):
    official, ours, _ = fixture_conversion
    recipe = copy.deepcopy(RECIPE)
    recipe["model"]["aux_heads"] = []
    recipe["model"]["query_encoder"] = None
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    torch.save({"state_dict": official}, tmp_path / "official.pth")
    args = ["convert", str(tmp_path / "recipe.yaml"), str(tmp_path / "official.pth"), "--out",
            str(tmp_path / "out.pt"), "--format", "mmdet3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "have no codetr counterpart" in res.output and "bbox_head.0." in res.output
    assert "--allow-unmatched" in res.output
    res = runner.invoke(app, args + ["--allow-unmatched"])
    assert res.exit_code == 0, res.output
    converted = extract_state_dict(load_checkpoint(tmp_path / "out.pt"))
    assert not any(k.startswith("collaborative.") for k in converted)
    for key, value in ours.items():
        if not key.startswith("collaborative."):
            assert torch.equal(converted[key], value), key
