"""In-process toy components so recipe tests don't depend on the real model code."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from codetr.core.registry import Component, ComponentConfig, registry


class ToyBackbone(ComponentConfig):
    type: Literal["toy_backbone"] = "toy_backbone"
    depth: int = Field(18, ge=1)


class ToyNeck(ComponentConfig):
    type: Literal["toy_neck"] = "toy_neck"
    hidden_dim: int | None = None


class ToyVariant(ComponentConfig):
    type: Literal["toy_variant"] = "toy_variant"
    hidden_dim: int | None = None
    num_queries: int | None = None
    num_levels: int | None = None
    num_classes: int | None = None
    num_decoder_layers: int | None = None
    dropout: float = Field(0.0, ge=0, le=1)


class ToyAssigner(ComponentConfig):
    type: Literal["toy_assigner"] = "toy_assigner"
    topk: int = Field(9, ge=1)



def _toy_head_config():
    from codetr.core.registry import component_field

    class ToyHead(ComponentConfig):
        type: Literal["toy_head"] = "toy_head"
        num_classes: int | None = None
        loss_weight: float = 1.0
        assigner: component_field("assigners")

    return ToyHead


TOYS = {
    "backbones": ("toy_backbone", ToyBackbone),
    "necks": ("toy_neck", ToyNeck),
    "variants": ("toy_variant", ToyVariant),
    "assigners": ("toy_assigner", ToyAssigner),
}


@pytest.fixture(autouse=True)
def toy_components():
    added = []
    for group, (name, cfg) in TOYS.items():
        registry.register(group, name, Component(config=cfg, build=lambda c, *a: c, summary="toy"))
        added.append((group, name))
    registry.register("aux_heads", "toy_head", Component(config=_toy_head_config(), build=lambda c: c))
    added.append(("aux_heads", "toy_head"))
    yield
    for group, name in added:
        registry.unregister(group, name)


TOY_RECIPE = {
    "name": "toy",
    "model": {
        "num_classes": 3,
        "hidden_dim": 64,
        "num_levels": 2,
        "num_queries": 10,
        "num_decoder_layers": 2,
        "backbone": {"type": "toy_backbone"},
        "neck": {"type": "toy_neck"},
        "variant": {"type": "toy_variant"},
        "aux_heads": [
            {"type": "toy_head", "assigner": {"type": "toy_assigner"}},
            {"type": "toy_head", "assigner": {"type": "toy_assigner", "topk": 3}},
        ],
    },
    "schedule": {"epochs": 2, "milestones": [1]},
}
