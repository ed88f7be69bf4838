"""The ``"gather"`` MSDA method (``embedding_bag`` over a zero-bordered value table) against ``"grid_sample"``:
same values, same gradients, same border semantics, same module behaviour; plus the ``method`` plumbing."""

from __future__ import annotations

import pytest
import torch

from codetr.ops.msda import MultiScaleDeformableAttention, multi_scale_deformable_attn
from tests.ops.test_msda import SHAPES, module_inputs
from tests.ops.test_msda import _module as msda_module


def _inputs(b=2, q=7, h=3, dh=5, p=3, shapes=SHAPES, lo=-0.3, hi=1.3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(a * c for a, c in shapes)
    value = torch.randn(b, s, h, dh, generator=g, dtype=dtype)
    loc = torch.rand(b, q, h, len(shapes), p, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    w = torch.rand(b, q, h, len(shapes), p, generator=g, dtype=dtype)
    return value, loc, w / w.sum((-1, -2), keepdim=True)


def _both(value, loc, w, shapes=SHAPES):
    return (multi_scale_deformable_attn(value, shapes, loc, w, method="grid_sample"),
            multi_scale_deformable_attn(value, shapes, loc, w, method="gather"))


def test_values_match_grid_sample_fp64_including_outside_locations():
    a, b = _both(*_inputs())
    assert b.dtype == torch.float64 and b.shape == a.shape
    assert (a - b).abs().max().item() <= 1e-12


def test_values_match_grid_sample_fp32():
    a, b = _both(*_inputs(dtype=torch.float32, b=1, q=50, h=8, dh=32, p=4, seed=3))
    assert (a - b).abs().max().item() <= 1e-5


def test_far_outside_and_exact_borders():
    value, loc, w = _inputs(b=1, q=8, h=2, dh=3, p=2, shapes=[(3, 4)], seed=4)
    loc = loc[:, :, :, :1]
    # exact borders, half a pixel outside, far outside, non-finite-free extremes
    pts = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0 + 0.5 / 4, 0.5], [-0.5 / 4, 0.5], [-3.0, 0.5], [0.5, 7.0],
                        [2.0, -2.0], [1.0 + 0.25 / 4, 0.5 / 3]], dtype=torch.float64)
    loc = pts.view(1, 8, 1, 1, 1, 2).expand(1, 8, 2, 1, 2, 2).contiguous()
    a, b = _both(value[:, :12], loc, w[:, :, :, :1], shapes=[(3, 4)])
    assert (a - b).abs().max().item() <= 1e-12


def test_non_finite_locations():
    """+-inf are far outside (zero); NaN propagates to the output as with grid_sample (never an invalid row)."""
    value, loc, w = _inputs(b=1, q=4, h=1, dh=2, p=1, shapes=[(2, 3)], seed=8)
    loc = torch.tensor([[float("inf"), 0.5], [float("-inf"), 0.5], [0.5, float("inf")], [float("nan"), 0.5]],
                       dtype=torch.float64).view(1, 4, 1, 1, 1, 2)
    a, b = _both(value[:, :6], loc, w[:, :, :, :1], shapes=[(2, 3)])
    assert torch.equal(b[0, :3], torch.zeros_like(b[0, :3]))
    assert torch.isnan(b[0, 3]).all() and torch.isnan(a[0, 3]).all()


def test_gradients_match_grid_sample():
    value, loc, w = _inputs(lo=0.02, hi=0.98, seed=5)
    grads = []
    for method in ("grid_sample", "gather"):
        args = [t.clone().requires_grad_(True) for t in (value, loc, w)]
        out = multi_scale_deformable_attn(args[0], SHAPES, args[1], args[2], method=method)
        grads.append(torch.autograd.grad((out * out.detach().sin()).sum(), args))
    for ga, gb in zip(*grads):
        assert (ga - gb).abs().max().item() <= 1e-10


def test_gradcheck():
    value, loc, w = _inputs(b=1, q=3, h=2, dh=2, p=2, shapes=[(3, 2), (2, 3)], lo=0.05, hi=0.95, seed=1)
    args = tuple(t.requires_grad_(True) for t in (value, loc, w))
    assert torch.autograd.gradcheck(
        lambda v, l_, a: multi_scale_deformable_attn(v, [(3, 2), (2, 3)], l_, a, method="gather"), args,
        eps=1e-6, atol=1e-6)


def test_int64_indices_for_huge_tables(monkeypatch):
    import codetr.ops.msda as msda

    value, loc, w = _inputs(seed=7)
    want = multi_scale_deformable_attn(value, SHAPES, loc, w, method="gather")
    monkeypatch.setattr(msda, "_INT32_MAX_ROWS", 0)
    args = [t.clone().requires_grad_(True) for t in (value, loc, w)]
    got = multi_scale_deformable_attn(args[0], SHAPES, args[1], args[2], method="gather")
    assert (got - want).abs().max().item() <= 1e-12
    got.sum().backward()
    assert all(a.grad is not None for a in args)


def test_no_grad_path_equals_autograd_path():
    value, loc, w = _inputs(dtype=torch.float32, seed=6)
    with torch.no_grad():
        a = multi_scale_deformable_attn(value, SHAPES, loc, w, method="gather")
    b = multi_scale_deformable_attn(value.requires_grad_(True), SHAPES, loc, w, method="gather")
    assert torch.allclose(a, b.detach(), atol=1e-6, rtol=0)
    assert loc.min() < 0  # the no-grad path clamps a private copy, never the caller's locations


def test_unknown_method():
    value, loc, w = _inputs()
    with pytest.raises(ValueError, match="method"):
        multi_scale_deformable_attn(value, SHAPES, loc, w, method="cuda_kernel")
    with pytest.raises(ValueError, match="method"):
        MultiScaleDeformableAttention(16, 2, 1, 2, method="fast")


def _module(method: str, seed: int = 0) -> MultiScaleDeformableAttention:
    return msda_module(seed=seed, perturb=0.3, method=method)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_methods_agree_with_padding_mask(ref_dim):
    query, value, pos, ref = module_inputs(9, 5, ref_dim)
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[1, 10:20] = True
    grid, gather = _module("grid_sample"), _module("gather")
    outs, grads = [], []
    for m in (grid, gather):
        q = query.clone().requires_grad_(True)
        out = m(q, value, ref, SHAPES, key_padding_mask=mask, query_pos=pos)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [q] + list(m.parameters())))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-10
    for ga, gb in zip(*grads):
        assert (ga - gb).abs().max().item() <= 1e-9


def test_module_auto_uses_gather_on_cpu(monkeypatch):
    import codetr.ops.msda as msda

    seen = []
    real = msda._sample_gather_pixels
    monkeypatch.setattr(msda, "_sample_gather_pixels", lambda *a: seen.append(1) or real(*a))
    m = _module("auto")
    assert "method='auto'" in repr(m)
    s = sum(a * c for a, c in SHAPES)
    m(torch.randn(1, 3, 16, dtype=torch.float64), torch.randn(1, s, 16, dtype=torch.float64),
      torch.rand(1, 3, len(SHAPES), 2, dtype=torch.float64), SHAPES)
    assert seen
    m.method = "grid_sample"
    seen.clear()
    m(torch.randn(1, 3, 16, dtype=torch.float64), torch.randn(1, s, 16, dtype=torch.float64),
      torch.rand(1, 3, len(SHAPES), 2, dtype=torch.float64), SHAPES)
    assert not seen


@pytest.mark.parametrize("grad", [True, False])
def test_module_autocast_bf16_matches_grid_sample(grad):
    """Under CPU autocast both methods sample in fp32 and return the same dtype (the fp32 residual promotes)."""
    g = torch.Generator().manual_seed(2)
    s = sum(a * c for a, c in SHAPES)
    query, value = torch.randn(1, 4, 16, generator=g), torch.randn(1, s, 16, generator=g)
    ref = torch.rand(1, 4, len(SHAPES), 2, generator=g)
    outs = []
    for method in ("grid_sample", "gather"):
        m = _module(method).float()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            outs.append(m(query, value, ref, SHAPES))
    assert outs[0].dtype == outs[1].dtype == torch.float32
    assert (outs[0] - outs[1]).abs().max().item() < 1e-2  # bf16 projections; the sampling itself is fp32
