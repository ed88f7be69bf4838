"""Every shipped recipe validates, builds, and runs one training forward/backward and one prediction
on a small image (the full-size models at their real widths and depths; only the image is small)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from codetr.assembly import build_detector
from codetr.assembly import load_recipe
from codetr.core.structures import Batch, Target

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("**/*.yaml"))


def small_batch(num_classes: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 160, 192, generator=g)
    masks = torch.zeros(2, 160, 192, dtype=torch.bool)
    masks[1, 128:, :] = True
    masks[1, :, 160:] = True
    targets = [
        Target(boxes=torch.tensor([[10.0, 20.0, 90.0, 120.0], [100.0, 30.0, 180.0, 90.0]]),
               labels=torch.tensor([0, num_classes - 1]), iscrowd=torch.zeros(2, dtype=torch.bool)),
        Target.empty(),  # an image without boxes in the same batch
    ]
    return Batch(images=images, masks=masks, targets=targets, image_sizes=torch.tensor([[160, 192], [128, 160]]),
                 orig_sizes=torch.tensor([[320, 384], [256, 320]]), image_ids=[1, 2])


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds_and_steps(path: Path):
    overrides = ["model.backbone.weights=null"]
    if yaml.safe_load(path.read_text()).get("model", {}).get("num_classes") is None:
        overrides.append("model.num_classes=6")  # normally derived from the (absent) dataset
    recipe = load_recipe(path, overrides, read_data=False)
    torch.manual_seed(0)
    model = build_detector(recipe.model)
    model.train()
    batch = small_batch(recipe.model.num_classes)
    losses = model.loss(batch)
    total = sum(losses.values())
    assert torch.isfinite(total), {k: float(v) for k, v in losses.items() if not torch.isfinite(v)}
    total.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters without gradient (DDP would need find_unused_parameters): {unused[:10]}"
    model.eval()
    dets = model.predict(batch)
    assert len(dets) == 2
    if recipe.model.test.soft_nms is None:
        assert len(dets[0]) == recipe.model.test.topk
    else:  # soft-NMS drops detections whose decayed score falls below its minimum
        assert 0 < len(dets[0]) <= recipe.model.test.soft_nms.max_per_image
    for d, (h, w) in zip(dets, batch.orig_sizes.tolist()):  # original frame, inside the image
        assert (d.boxes[:, 0::2] <= w + 1e-3).all() and (d.boxes[:, 1::2] <= h + 1e-3).all()
