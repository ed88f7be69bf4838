"""Any image size from 1 px up: two-stage variants get at least their top-k tokens (masked padding)."""

from __future__ import annotations

import pytest
import torch

from codetr.assembly import build_detector, load_recipe
from codetr.core.detector import pad_to_min_tokens
from codetr.core.structures import Batch, Target

DINO = "model.variant={type: dino, num_encoder_layers: 1, ffn_dim: 128, num_heads: 4, num_points: 2}"


def _batch(side: int) -> Batch:
    box = torch.tensor([[0.0, 0.0, side * 0.8, side * 0.8]])
    return Batch(images=torch.randn(1, 3, side, side), masks=torch.zeros(1, side, side, dtype=torch.bool),
                 targets=[Target(box, torch.tensor([1]), torch.zeros(1, dtype=torch.bool))],
                 image_sizes=torch.tensor([[side, side]]), orig_sizes=torch.tensor([[3 * side, 3 * side]]),
                 image_ids=[0])


@pytest.mark.parametrize("extra", [[], [DINO]], ids=["deformable_pp", "dino"])
def test_tiny_images_predict_and_train(extra):
    recipe = load_recipe("recipes/tests/tiny.yaml", ["model.num_classes=6", *extra], read_data=False)
    torch.manual_seed(0)
    model = build_detector(recipe.model)
    for side in (1, 7, 33):  # 33 px: 3x3 + 2x2 + 1x1 = 14 tokens for 20 proposals
        model.eval()
        det = model.predict(_batch(side))[0]
        assert len(det) == recipe.model.test.topk
        assert torch.isfinite(det.boxes).all() and det.boxes.min() >= 0 and det.boxes.max() <= 3 * side
        model.train()
        losses = model.loss(_batch(side))
        assert all(torch.isfinite(v) for v in losses.values()), side


def test_pad_to_min_tokens_only_pads_when_needed():
    levels = [torch.ones(2, 4, 3, 3), torch.ones(2, 4, 2, 2)]
    masks = [torch.zeros(2, 3, 3, dtype=torch.bool), torch.zeros(2, 2, 2, dtype=torch.bool)]
    same_l, same_m = pad_to_min_tokens(levels, masks, [8, 16], 13)
    assert same_l is levels and same_m is masks
    out_l, out_m = pad_to_min_tokens(levels, masks, [8, 16], 30)
    assert [tuple(x.shape[-2:]) for x in out_l] == [(5, 5), (3, 3)]  # +2 cells at stride 8, +1 at stride 16
    assert sum(x.shape[-2] * x.shape[-1] for x in out_l) >= 30
    assert out_m[0][:, :3, :3].eq(False).all() and out_m[0][:, 3:].all() and out_m[0][:, :, 3:].all()
    assert out_l[0][:, :, 3:].eq(0).all() and torch.equal(out_l[0][:, :, :3, :3], levels[0])
