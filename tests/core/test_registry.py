"""Entry-point registries: built-ins, third-party plugins, broken plugins, unknown names."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from codetr.assembly import load_recipe_dict
from codetr.core.config import RecipeError
from codetr.core.registry import ComponentError, registry

from .conftest import TOY_RECIPE

REPO = Path(__file__).resolve().parents[2]


def test_unknown_name_lists_available():
    with pytest.raises(ComponentError) as exc:
        registry.get("assigners", "toy_asigner")
    assert "available:" in str(exc.value) and "toy_assigner" in str(exc.value)
    assert "Did you mean 'toy_assigner'" in str(exc.value)
    with pytest.raises(ComponentError, match="unknown component group"):
        registry.get("nope", "x")


def test_builtins_come_from_entry_points():
    rows = registry.listing()
    from_codetr = [r for r in rows if r["distribution"] == "codetr"]
    assert from_codetr, "codetr's own components must be registered through its entry points"
    assert all(r["status"] == "ok" for r in from_codetr), [r for r in from_codetr if r["status"] != "ok"]


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    dist = tmp_path / "broken_codetr_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-codetr-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[codetr.assigners]\nbroken = broken_codetr_plugin_missing_module:COMPONENT\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    registry.refresh()
    yield
    monkeypatch.undo()
    importlib.invalidate_caches()
    registry.refresh()


def test_broken_plugin_is_reported_and_isolated(broken_plugin):
    with pytest.raises(ComponentError) as exc:
        registry.get("assigners", "broken")
    msg = str(exc.value)
    assert "broken-codetr-plugin" in msg and "ModuleNotFoundError" in msg
    # the rest of the group still works
    assert registry.get("assigners", "toy_assigner").config.__name__ == "ToyAssigner"
    failures = {f.name: f for f in registry.failures()}
    assert failures["broken"].distribution == "broken-codetr-plugin"


def test_plugin_resolves_from_recipe(simota_installed):
    rows = {(r["group"], r["name"]): r for r in registry.listing()}
    assert rows[("codetr.assigners", "simota")]["distribution"] == "codetr-simota"
    data = {**TOY_RECIPE, "model": {**TOY_RECIPE["model"], "aux_heads": [
        {"type": "toy_head", "assigner": {"type": "simota", "center_radius": 1.5}}]}}
    r = load_recipe_dict(data)
    cfg = r.model.aux_heads[0].assigner
    assert type(cfg).__name__ == "SimOTAConfig" and cfg.center_radius == 1.5
    # plugin options are validated like built-in ones
    data["model"]["aux_heads"][0]["assigner"] = {"type": "simota", "center_radius": -1, "candiate_topk": 3}
    with pytest.raises(RecipeError) as exc:
        load_recipe_dict(data)
    text = str(exc.value)
    assert "model.aux_heads[0].assigner.center_radius: must be > 0, got -1" in text
    assert "did you mean 'candidate_topk'" in text


def test_plugin_assigner_assigns(simota_installed):
    cfg = registry.validate("assigners", {"type": "simota"})
    assigner = registry.build("assigners", cfg)
    # anchors of side 8*stride on a stride-8 grid over a 64x64 image
    ys, xs = torch.meshgrid(torch.arange(0, 64, 8.0), torch.arange(0, 64, 8.0), indexing="ij")
    c = torch.stack([xs.flatten(), ys.flatten()], 1)
    anchors = torch.cat([c - 32, c + 32], 1)
    gt = torch.tensor([[0.0, 0.0, 30.0, 30.0], [34.0, 34.0, 64.0, 64.0]])
    res = assigner.assign(anchors, [anchors.shape[0]], gt, torch.tensor([1, 2]), num_classes=3)
    assert res.num_pos >= 2
    assert set(res.labels[res.pos_mask].tolist()) == {1, 2}
    assert (res.labels[~res.pos_mask] == 3).all()
    empty = assigner.assign(anchors, [anchors.shape[0]], gt[:0], torch.tensor([], dtype=torch.long), num_classes=3)
    assert empty.num_pos == 0


def test_plugin_assigner_trains_a_step(simota_installed):
    """The third-party assigner drives a real aux head through a training step of a real detector."""
    from codetr.assembly import build_detector
    from codetr.assembly import load_recipe
    from codetr.core.structures import Batch, Target

    recipe = load_recipe(REPO / "recipes" / "tests" / "tiny.yaml", [
        "model.aux_heads=[{type: atss, feat_channels: 64, norm_groups: 16, assigner: {type: simota}}]",
        "model.query_encoder={type: positive_queries, head_pos_embed: vector}",
    ], read_data=False)
    assert type(recipe.model.aux_heads[0].assigner).__name__ == "SimOTAConfig"
    torch.manual_seed(0)
    model = build_detector(recipe.model).train()
    batch = Batch(images=torch.randn(1, 3, 96, 128), masks=torch.zeros(1, 96, 128, dtype=torch.bool),
                  targets=[Target(torch.tensor([[10.0, 12.0, 70.0, 80.0]]), torch.tensor([2]),
                                  torch.zeros(1, dtype=torch.bool))],
                  image_sizes=torch.tensor([[96, 128]]), orig_sizes=torch.tensor([[96, 128]]), image_ids=[1])
    losses = model.loss(batch)
    assert float(losses["aux0.loss_cls"].detach()) > 0 and "loss_cls_aux0" in losses
    sum(losses.values()).backward()
    head = model.collaborative.heads[0]
    assert all(p.grad is not None for p in head.parameters())
