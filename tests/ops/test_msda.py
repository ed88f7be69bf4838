"""Multi-scale deformable attention: exactness vs an explicit per-point reference, gradients, borders,
module semantics (2-D / 4-D references, masks, residual), autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from codetr.ops.msda import MultiScaleDeformableAttention, multi_scale_deformable_attn

SHAPES = [(6, 4), (3, 2), (2, 5), (1, 1)]  # non-square + single-pixel levels


# --------------------------------------------------------------------------- slow independent reference
def reference_msda(value: torch.Tensor, shapes, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Explicit per-point bilinear interpolation, fp64, following the CUDA kernel's rules.

    pixel coords: x = loc_x * W - 0.5, y = loc_y * H - 0.5; the 4 integer neighbours contribute
    (1-|dx|)(1-|dy|) * v[y_i, x_i] when inside the map, 0 otherwise.
    """
    value = value.detach().double()
    locations = locations.detach().double()
    weights = weights.detach().double()
    b, _, h, dh = value.shape
    _, q, _, nl, p, _ = locations.shape
    starts = [0]
    for hh, ww in shapes:
        starts.append(starts[-1] + hh * ww)
    out = torch.zeros(b, q, h, dh, dtype=torch.float64)
    for bi in range(b):
        for qi in range(q):
            for hi in range(h):
                for li, (hh, ww) in enumerate(shapes):
                    vmap = value[bi, starts[li]:starts[li + 1], hi].reshape(hh, ww, dh)
                    for pi in range(p):
                        x = float(locations[bi, qi, hi, li, pi, 0]) * ww - 0.5
                        y = float(locations[bi, qi, hi, li, pi, 1]) * hh - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(dh, dtype=torch.float64)
                        for yi in (y0, y0 + 1):
                            for xi in (x0, x0 + 1):
                                if 0 <= yi < hh and 0 <= xi < ww:
                                    wgt = (1.0 - abs(x - xi)) * (1.0 - abs(y - yi))
                                    acc += wgt * vmap[yi, xi]
                        out[bi, qi, hi] += float(weights[bi, qi, hi, li, pi]) * acc
    return out.reshape(b, q, h * dh)


def _random_inputs(b=2, q=5, h=2, dh=3, p=3, shapes=SHAPES, lo=-0.2, hi=1.2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(a * c for a, c in shapes)
    nl = len(shapes)
    value = torch.randn(b, s, h, dh, generator=g, dtype=dtype)
    loc = (lo + (hi - lo) * torch.rand(b, q, h, nl, p, 2, generator=g, dtype=dtype))
    w = torch.randn(b, q, h, nl * p, generator=g, dtype=dtype).softmax(-1).view(b, q, h, nl, p)
    return value, loc, w


def _level_tokens(shapes, level):
    start = sum(a * c for a, c in shapes[:level])
    return start, start + shapes[level][0] * shapes[level][1]


# --------------------------------------------------------------------------- core op
def test_matches_reference_fp64():
    value, loc, w = _random_inputs()
    got = multi_scale_deformable_attn(value, SHAPES, loc, w)
    want = reference_msda(value, SHAPES, loc, w)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-10


def test_fp32_close_to_fp64():
    value, loc, w = _random_inputs(seed=3)
    got = multi_scale_deformable_attn(value.float(), SHAPES, loc.float(), w.float())
    assert got.dtype == torch.float32
    want = reference_msda(value, SHAPES, loc, w)
    assert (got.double() - want).abs().max().item() < 1e-5


def test_matches_mmcv_stack_then_sum_order():
    """Same as the mmcv formulation (stack all levels, multiply, one sum over L*P)."""
    value, loc, w = _random_inputs(b=1, q=7, h=4, dh=8, p=4, dtype=torch.float32, seed=5)
    b, _, h, dh = value.shape
    q, nl, p = loc.shape[1], loc.shape[3], loc.shape[4]
    vals = value.split([a * c for a, c in SHAPES], dim=1)
    grids = 2 * loc - 1
    samples = []
    for lvl, (hh, ww) in enumerate(SHAPES):
        v = vals[lvl].flatten(2).transpose(1, 2).reshape(b * h, dh, hh, ww)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    ww_ = w.transpose(1, 2).reshape(b * h, 1, q, nl * p)
    want = (torch.stack(samples, dim=-2).flatten(-2) * ww_).sum(-1).view(b, h * dh, q).transpose(1, 2)
    got = multi_scale_deformable_attn(value, SHAPES, loc, w)
    assert (got - want).abs().max().item() < 1e-6


def test_gradcheck():
    value, loc, w = _random_inputs(b=1, q=2, h=2, dh=2, p=2, shapes=[(3, 2), (2, 3)], lo=0.05, hi=0.95, seed=1)
    shapes = [(3, 2), (2, 3)]
    value.requires_grad_(True)
    loc.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, l_, a: multi_scale_deformable_attn(v, shapes, l_, a),
                                    (value, loc, w), eps=1e-6, atol=1e-6)


def _one_point(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample one (H, W) map (single head, Dh=1) at normalised (x, y) with weight 1."""
    hh, ww = value_map.shape
    value = value_map.reshape(1, hh * ww, 1, 1).double()
    loc = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    return multi_scale_deformable_attn(value, [(hh, ww)], loc, w).reshape(())


def test_pixel_centres_and_borders():
    hh, ww = 3, 4
    vmap = torch.arange(1.0, 1.0 + hh * ww).view(hh, ww)
    # pixel centre -> exact pixel value (x indexes W, y indexes H)
    for i in range(hh):
        for j in range(ww):
            assert _one_point(vmap, (j + 0.5) / ww, (i + 0.5) / hh).item() == pytest.approx(vmap[i, j].item(), abs=1e-12)
    # corners of the map: 1/4 of the corner pixel (three neighbours are zero padding)
    assert _one_point(vmap, 1.0, 1.0).item() == pytest.approx(vmap[-1, -1].item() / 4, abs=1e-12)
    assert _one_point(vmap, 0.0, 0.0).item() == pytest.approx(vmap[0, 0].item() / 4, abs=1e-12)
    # left border at a pixel-centre row: half the pixel
    assert _one_point(vmap, 0.0, 1.5 / hh).item() == pytest.approx(vmap[1, 0].item() / 2, abs=1e-12)
    # exactly half a pixel outside -> 0 (up to the rounding of 2*loc-1 inside grid_sample)
    for x, y in [(1.0 + 0.5 / ww, 0.5), (-0.5 / ww, 0.5), (0.5, 1.0 + 0.5 / hh), (0.5, -0.5 / hh)]:
        assert abs(_one_point(vmap, x, y).item()) <= 1e-12
    # further outside -> exactly 0
    for x, y in [(1.0 + 0.6 / ww, 0.5), (-0.6 / ww, 0.5), (-3.0, 0.5), (0.5, 7.0), (2.0, -2.0)]:
        assert _one_point(vmap, x, y).item() == 0.0
    # partially outside (a quarter pixel beyond the right edge): 1/4 weight on the last column
    got = _one_point(vmap, 1.0 + 0.25 / ww, 0.5 / hh).item()
    assert got == pytest.approx(0.25 * vmap[0, -1].item(), abs=1e-12)


def test_single_pixel_level():
    vmap = torch.tensor([[5.0]])
    assert _one_point(vmap, 0.5, 0.5).item() == pytest.approx(5.0, abs=1e-12)
    assert _one_point(vmap, 0.25, 0.5).item() == pytest.approx(0.75 * 5.0, abs=1e-12)
    assert _one_point(vmap, 0.0, 0.0).item() == pytest.approx(0.25 * 5.0, abs=1e-12)
    assert _one_point(vmap, 1.5, 0.5).item() == 0.0


def test_non_square_level_orientation():
    vmap = torch.arange(10.0).view(2, 5)
    assert _one_point(vmap, 3.5 / 5, 1.5 / 2).item() == pytest.approx(vmap[1, 3].item(), abs=1e-12)
    # midway between columns 1 and 2 on row 0
    assert _one_point(vmap, 2.0 / 5, 0.5 / 2).item() == pytest.approx(1.5, abs=1e-12)


def test_shape_errors():
    value, loc, w = _random_inputs()
    with pytest.raises(ValueError, match=r"cover 41 tokens but value has S = 40"):
        multi_scale_deformable_attn(value[:, :-1], SHAPES, loc, w)
    with pytest.raises(ValueError, match="levels"):
        multi_scale_deformable_attn(value, SHAPES[:3], loc, w)
    with pytest.raises(ValueError, match="attention_weights"):
        multi_scale_deformable_attn(value, SHAPES, loc, w[..., :-1])


def test_spatial_shapes_tensor_accepted():
    value, loc, w = _random_inputs()
    a = multi_scale_deformable_attn(value, SHAPES, loc, w)
    b = multi_scale_deformable_attn(value, torch.tensor(SHAPES), loc, w)
    assert torch.equal(a, b)


def test_autocast_bf16_cpu_keeps_fp32_sampling(monkeypatch):
    value, loc, w = _random_inputs(dtype=torch.float32, seed=7)
    value_bf16 = value.to(torch.bfloat16)
    seen = []
    real = F.grid_sample

    def spy(inp, grid, *args, **kwargs):
        seen.append((inp.dtype, grid.dtype))
        return real(inp, grid, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = multi_scale_deformable_attn(value_bf16, SHAPES, loc.to(torch.bfloat16), w)
    assert got.dtype == torch.bfloat16
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    ref = multi_scale_deformable_attn(value_bf16.float(), SHAPES, loc.to(torch.bfloat16).float(), w)
    assert torch.equal(got, ref.to(torch.bfloat16))


# --------------------------------------------------------------------------- module
def _module(c=16, h=2, nl=len(SHAPES), p=3, seed=0, perturb=0.1, **kw) -> MultiScaleDeformableAttention:
    torch.manual_seed(seed)
    m = MultiScaleDeformableAttention(embed_dims=c, num_heads=h, num_levels=nl, num_points=p, **kw).double()
    # perturb so offsets / attention depend on the query
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(perturb * torch.randn_like(prm))
    return m


def module_inputs(seed: int, q: int, ref_dim: int, b: int = 2, c: int = 16):
    """fp64 (query, value, query_pos, reference_points) for a module over ``SHAPES``."""
    g = torch.Generator().manual_seed(seed)
    s = sum(a * w for a, w in SHAPES)
    query = torch.randn(b, q, c, generator=g, dtype=torch.float64)
    value = torch.randn(b, s, c, generator=g, dtype=torch.float64)
    pos = torch.randn(b, q, c, generator=g, dtype=torch.float64)
    ref = torch.rand(b, q, len(SHAPES), ref_dim, generator=g, dtype=torch.float64)
    return query, value, pos, ref


def _manual(m: MultiScaleDeformableAttention, query, value, ref, shapes, mask=None, identity=None, pos=None):
    """Module forward re-derived with explicit sampling locations and the slow reference."""
    b, q, c = query.shape
    h, nl, p = m.num_heads, m.num_levels, m.num_points
    q_in = query if pos is None else query + pos
    v = m.value_proj(value)
    if mask is not None:
        v = v * (~mask)[..., None].double()
    v = v.view(b, -1, h, c // h)
    off = m.sampling_offsets(q_in).view(b, q, h, nl, p, 2)
    aw = m.attention_weights(q_in).view(b, q, h, nl * p).softmax(-1).view(b, q, h, nl, p)
    loc = torch.empty(b, q, h, nl, p, 2, dtype=torch.float64)
    for li, (hh, ww) in enumerate(shapes):
        if ref.shape[-1] == 2:
            loc[:, :, :, li, :, 0] = ref[:, :, None, li, None, 0] + off[:, :, :, li, :, 0] / ww
            loc[:, :, :, li, :, 1] = ref[:, :, None, li, None, 1] + off[:, :, :, li, :, 1] / hh
        else:
            for k in range(2):
                loc[:, :, :, li, :, k] = (ref[:, :, None, li, None, k]
                                          + off[:, :, :, li, :, k] / p * ref[:, :, None, li, None, 2 + k] * 0.5)
    out = m.output_proj(reference_msda(v, shapes, loc, aw))
    return out + (query if identity is None else identity)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_manual(ref_dim):
    m = _module()
    query, value, pos, ref = module_inputs(11, 4, ref_dim)
    got = m(query, value, ref, SHAPES, query_pos=pos)
    want = _manual(m, query, value, ref, SHAPES, pos=pos)
    assert (got - want).abs().max().item() <= 1e-10


def test_module_4d_ref_equals_2d_ref_when_scaled():
    """4-D ref with w_h = 2 * P / (W_l, H_l) gives the same locations as 2-D refs (single level)."""
    shapes = [(3, 5)]
    m = _module(nl=1, p=2)
    g = torch.Generator().manual_seed(2)
    query = torch.randn(1, 3, 16, generator=g, dtype=torch.float64)
    value = torch.randn(1, 15, 16, generator=g, dtype=torch.float64)
    xy = torch.rand(1, 3, 1, 2, generator=g, dtype=torch.float64)
    wh = torch.tensor([2 * 2 / 5, 2 * 2 / 3], dtype=torch.float64).expand(1, 3, 1, 2)
    a = m(query, value, xy, shapes)
    b = m(query, value, torch.cat([xy, wh], -1), shapes)
    assert (a - b).abs().max().item() < 1e-12


def test_key_padding_mask_zeroes_values():
    m = _module()
    g = torch.Generator().manual_seed(4)
    s = sum(a * c for a, c in SHAPES)
    query = torch.randn(2, 4, 16, generator=g, dtype=torch.float64)
    value = torch.randn(2, s, 16, generator=g, dtype=torch.float64)
    ref = torch.rand(2, 4, len(SHAPES), 2, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, s, dtype=torch.bool)
    mask[0, 3:20] = True
    mask[1, -5:] = True
    got = m(query, value, ref, SHAPES, key_padding_mask=mask)
    want = _manual(m, query, value, ref, SHAPES, mask=mask)
    assert (got - want).abs().max().item() <= 1e-10
    # masked tokens have no influence whatever their content
    value2 = value.clone()
    value2[mask] = 1e3 * torch.randn(int(mask.sum()), 16, dtype=torch.float64)
    assert torch.equal(m(query, value2, ref, SHAPES, key_padding_mask=mask), got)
    with pytest.raises(ValueError, match="bool"):
        m(query, value, ref, SHAPES, key_padding_mask=mask.long())


def test_identity_value_none_and_batch_first():
    m = _module(nl=1)
    shapes = [(2, 3)]
    g = torch.Generator().manual_seed(8)
    query = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    ref = torch.rand(2, 6, 1, 2, generator=g, dtype=torch.float64)
    ident = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    base = m(query, None, ref, shapes)  # value = query, identity = query
    assert torch.equal(base, m(query, query, ref, shapes, identity=query))
    no_res = m(query, None, ref, shapes, add_identity=False)
    assert torch.allclose(no_res + query, base, atol=1e-12, rtol=0)
    assert torch.allclose(m(query, None, ref, shapes, identity=ident), no_res + ident, atol=1e-12, rtol=0)
    # sequence-first layout gives the same result
    m_sf = _module(nl=1, batch_first=False)
    m_sf.load_state_dict(m.state_dict())
    sf = m_sf(query.transpose(0, 1), None, ref, shapes)
    assert torch.allclose(sf.transpose(0, 1), base, atol=1e-12, rtol=0)


def test_module_errors_name_numbers():
    m = _module()
    s = sum(a * c for a, c in SHAPES)
    query = torch.randn(1, 2, 16, dtype=torch.float64)
    value = torch.randn(1, s + 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"cover {s} tokens but value has {s + 1} tokens"):
        m(query, value, torch.rand(1, 2, len(SHAPES), 2, dtype=torch.float64), SHAPES)
    with pytest.raises(ValueError, match=r"last dim 3"):
        m(query, value[:, :s], torch.rand(1, 2, len(SHAPES), 3, dtype=torch.float64), SHAPES)
    with pytest.raises(ValueError, match="num_levels=4"):
        m(query, value[:, :24], torch.rand(1, 2, len(SHAPES), 2, dtype=torch.float64), SHAPES[:1])
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dims=10, num_heads=3)


def test_official_init():
    m = MultiScaleDeformableAttention(embed_dims=32, num_heads=8, num_levels=2, num_points=3)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    assert torch.count_nonzero(m.attention_weights.weight) == 0
    assert torch.count_nonzero(m.attention_weights.bias) == 0
    assert torch.count_nonzero(m.value_proj.bias) == 0 and torch.count_nonzero(m.output_proj.bias) == 0
    bias = m.sampling_offsets.bias.view(8, 2, 3, 2)
    for k in range(8):
        d = torch.tensor([math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)])
        d = d / d.abs().max()
        for lvl in range(2):
            for pt in range(3):
                assert torch.allclose(bias[k, lvl, pt], d * (pt + 1), atol=1e-6)
    bound = math.sqrt(6.0 / (32 + 32))
    assert m.value_proj.weight.abs().max() <= bound
    names = {n for n, _ in m.named_parameters()}
    assert names == {f"{a}.{b}" for a in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
                     for b in ("weight", "bias")}
    assert m.value_proj.weight.shape == (32, 32) and m.sampling_offsets.weight.shape == (8 * 2 * 3 * 2, 32)


def test_module_autocast_bf16_cpu():
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=len(SHAPES), num_points=2)
    s = sum(a * c for a, c in SHAPES)
    query, value = torch.randn(2, 3, 16), torch.randn(2, s, 16)
    ref = torch.rand(2, 3, len(SHAPES), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(query, value, ref, SHAPES, add_identity=False)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref_out = m(query, value, ref, SHAPES, add_identity=False)
    assert (out.float() - ref_out).abs().max().item() < 0.05
    out.float().sum().backward()
    assert m.value_proj.weight.grad is not None
