"""The CPU RoIAlign path against torchvision's kernel (forward and feature gradient)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from codetr.ops.roi_align import roi_align


def _case(seed: int, k: int = 60, h: int = 13, w: int = 17, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, 5, h, w, generator=g, dtype=torch.float64)
    # boxes in input pixels (stride 8): some outside the map, some tiny, some degenerate (zero width)
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([w * 8.0, h * 8.0]) - 24
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * 120
    wh[:4] = torch.tensor([[0.0, 10.0], [10.0, 0.0], [0.3, 0.2], [300.0, 5.0]], dtype=torch.float64)
    bidx = torch.randint(0, b, (k, 1), generator=g).double()
    return feats, torch.cat([bidx, xy, xy + wh], 1)


@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torchvision_forward_and_gradient(sampling_ratio: int, aligned: bool, seed: int) -> None:
    feats, rois = _case(seed)
    ours_in = feats.clone().requires_grad_()
    ref_in = feats.clone().requires_grad_()
    ours = roi_align(ours_in, rois, 7, 1 / 8, sampling_ratio, aligned)
    ref = tv_roi_align(ref_in, rois, (7, 7), 1 / 8, sampling_ratio, aligned)
    assert ours.shape == ref.shape == (rois.shape[0], 5, 7, 7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(ours, ours_in, grad)
    (g_ref,) = torch.autograd.grad(ref, ref_in, grad)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)


def test_float32_and_empty() -> None:
    feats, rois = _case(3)
    torch.testing.assert_close(roi_align(feats.float(), rois.float(), 7, 1 / 8, 0),
                               tv_roi_align(feats.float(), rois.float(), (7, 7), 1 / 8, 0, True), rtol=1e-5, atol=1e-5)
    assert roi_align(feats, rois[:0], 7, 1 / 8, 2).shape == (0, 5, 7, 7)
