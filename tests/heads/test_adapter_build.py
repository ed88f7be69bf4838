"""``model.co_detr.adapter``: the multi-scale adapter for multi-level encoders, the single-scale adapter (paper §A2)
for one-level encoders, the aux pyramid's level count as the one source of truth for the heads, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codetr.assembly import build_detector, load_recipe
from codetr.assembly.build import aux_pyramid_levels
from codetr.core.config import RecipeError
from codetr.heads.adapter import MultiScaleAdapter, SingleScaleAdapter
from tests.integration.test_recipes_smoke import small_batch

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tests" / "tiny.yaml"
AUX = ("model.aux_heads=[{type: faster_rcnn, fc_out_channels: 32, feat_channels: 32}, "
       "{type: atss, feat_channels: 32, assigner: {type: atss, topk: 3}}]")
CO = [AUX, "model.query_encoder={type: positive_queries, head_pos_embed: vector}"]
SINGLE = ["model.num_levels=1", "model.backbone.out_indices=[4]", "model.neck.num_extra_levels=0",
          "model.num_queries=10", "model.test.topk=10"]


def _recipe(*overrides: str):
    return load_recipe(TINY, list(overrides), read_data=False)


def _step(model) -> dict[str, torch.Tensor]:
    model.train()
    losses = model.loss(small_batch(6))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]
    return losses


def test_single_level_encoder_gets_the_single_scale_pyramid():
    recipe = _recipe(*CO, *SINGLE)
    assert aux_pyramid_levels(recipe.model, [32]) == 5
    torch.manual_seed(0)
    model = build_detector(recipe.model)
    adapter = model.collaborative.adapter
    assert isinstance(adapter, SingleScaleAdapter) and (adapter.num_up, adapter.num_down) == (2, 2)
    atss = model.collaborative.heads[1]
    assert len(atss.scales) == 5
    memory = model.encode(small_batch(6))
    pyramid = model.collaborative.pyramid(memory, small_batch(6))
    assert pyramid.strides == [8, 16, 32, 64, 128]
    assert [tuple(m.shape[-2:]) for m in pyramid.maps] == [(20, 24), (10, 12), (5, 6), (3, 3), (2, 2)]
    losses = _step(model)
    assert {"aux0.loss_rpn_cls", "aux1.loss_cls", "loss_cls_aux0", "loss_cls_aux1"} <= set(losses)


def test_multi_level_encoder_keeps_the_official_adapter():
    recipe = _recipe(*CO)
    model = build_detector(recipe.model)
    adapter = model.collaborative.adapter
    assert isinstance(adapter, MultiScaleAdapter) and adapter.num_extra == 1
    assert len(model.collaborative.heads[1].scales) == 3 + 1


def test_adapter_can_be_chosen_and_sized():
    recipe = _recipe(*CO, *SINGLE, "model.co_detr.adapter={type: multi_scale, num_extra: 2}")
    model = build_detector(recipe.model)
    assert isinstance(model.collaborative.adapter, MultiScaleAdapter)
    assert len(model.collaborative.heads[1].scales) == 3
    _step(model)
    recipe = _recipe(*CO, *SINGLE, "model.co_detr.adapter={type: single_scale, min_stride: 16, max_stride: 64}")
    model = build_detector(recipe.model)
    adapter = model.collaborative.adapter
    assert (adapter.num_up, adapter.num_down) == (1, 1) and len(model.collaborative.heads[1].scales) == 3


def test_explicit_head_strides_win_over_the_adapter_count():
    recipe = _recipe(AUX.replace("topk: 3}}", "topk: 3}, strides: [8, 16, 32, 64, 128]}"), CO[1], *SINGLE)
    assert len(build_detector(recipe.model).collaborative.heads[1].scales) == 5


def test_bad_adapter_strides_are_named():
    recipe = _recipe(*CO, *SINGLE, "model.co_detr.adapter={type: single_scale, min_stride: 12}")
    with pytest.raises(ValueError, match=r"model\.co_detr\.adapter\.min_stride"):
        build_detector(recipe.model)
    with pytest.raises(RecipeError, match="min_stride"):
        _recipe(*CO, "model.co_detr.adapter={min_stride: 256}")
