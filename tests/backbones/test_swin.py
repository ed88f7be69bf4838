"""Swin backbone: equivalence with an independent fp64 reference of the official detection Swin, shapes, odd sizes,
freezing, checkpointing, drop path, weight loading (official / Co-DETR / mmdet layouts), window resizing, config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn
from torchvision.models.swin_transformer import shifted_window_attention

from codetr.backbones.swin import (ARCHS, COMPONENT, SwinConfig, SwinTransformer, WindowAttention, build_swin,
                                   official_swin_key_map, resize_relative_position_bias_table, shifted_window_mask)
from codetr.core.registry import Registry

SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


def _small(**kw) -> SwinTransformer:
    args = {**SMALL, "window_size": 3, "drop_path_rate": 0.0, "out_indices": (1, 2, 3, 4), **kw}
    return SwinTransformer(**args)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (LayerNorm affine and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_norm_weight(name):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif "relative_position_bias_table" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(fan_in))


def _is_norm_weight(name: str) -> bool:
    return name.endswith(".weight") and ("norm" in name.split(".")[-2])


# =========================================================================== independent reference (official algorithm)
def _ln(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _ref_index(ws: int) -> Tensor:
    coords = [(h, w) for h in range(ws) for w in range(ws)]
    idx = torch.empty(len(coords), len(coords), dtype=torch.long)
    for i, (hi, wi) in enumerate(coords):
        for j, (hj, wj) in enumerate(coords):
            idx[i, j] = (hi - hj + ws - 1) * (2 * ws - 1) + (wi - wj + ws - 1)
    return idx


def _ref_attention(x: Tensor, p: dict, pre: str, heads: int, ws: int, shift: int) -> Tensor:
    """Window by window, head by head: pad, roll, (q k^T)/sqrt(d) + bias + region mask, softmax, proj, unroll."""
    B, H, W, C = x.shape
    hd = C // heads
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    regions = torch.zeros(Hp, Wp)
    if shift:
        count = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                regions[hs, wsl] = count
                count += 1
    bias = p[pre + "relative_position_bias_table"][_ref_index(ws)]  # n, n, heads
    out = torch.zeros_like(x)
    for b in range(B):
        for gy in range(Hp // ws):
            for gx in range(Wp // ws):
                sl = (slice(gy * ws, (gy + 1) * ws), slice(gx * ws, (gx + 1) * ws))
                tok = x[b][sl].reshape(ws * ws, C)
                lab = regions[sl].reshape(-1)
                qkv = tok @ p[pre + "qkv.weight"].t() + p[pre + "qkv.bias"]
                o = []
                for h in range(heads):
                    q = qkv[:, h * hd:(h + 1) * hd] * hd ** -0.5
                    k = qkv[:, C + h * hd:C + (h + 1) * hd]
                    v = qkv[:, 2 * C + h * hd:2 * C + (h + 1) * hd]
                    a = q @ k.t() + bias[:, :, h]
                    if shift:
                        a = a + (lab[:, None] != lab[None, :]).to(a.dtype) * -100.0
                    o.append(torch.softmax(a, -1) @ v)
                o = torch.cat(o, 1) @ p[pre + "proj.weight"].t() + p[pre + "proj.bias"]
                out[b][sl] = o.reshape(ws, ws, C)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out[:, :H, :W]


def reference_swin(p: dict, images: Tensor, depths, heads, ws: int, out_indices, patch: int = 4) -> list[Tensor]:
    """Official detection-Swin forward from an official-layout state dict (no drop path)."""
    B, _, H, W = images.shape
    x = F.pad(images, (0, (-W) % patch, 0, (-H) % patch))
    x = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch).permute(0, 2, 3, 1)
    x = _ln(x, p["patch_embed.norm.weight"], p["patch_embed.norm.bias"])
    outs = []
    for s in range(max(out_indices)):
        for b in range(depths[s]):
            pre = f"layers.{s}.blocks.{b}."
            shift = 0 if b % 2 == 0 else ws // 2
            y = _ln(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"])
            x = x + _ref_attention(y, p, pre + "attn.", heads[s], ws, shift)
            y = _ln(x, p[pre + "norm2.weight"], p[pre + "norm2.bias"])
            y = F.gelu(y @ p[pre + "mlp.fc1.weight"].t() + p[pre + "mlp.fc1.bias"])
            x = x + (y @ p[pre + "mlp.fc2.weight"].t() + p[pre + "mlp.fc2.bias"])
        if s + 1 in out_indices:
            o = _ln(x, p[f"norm{s}.weight"], p[f"norm{s}.bias"])
            outs.append(o.permute(0, 3, 1, 2))
        if s + 1 < max(out_indices):
            pre = f"layers.{s}.downsample."
            _, h, w, _ = x.shape
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = _ln(x, p[pre + "norm.weight"], p[pre + "norm.bias"]) @ p[pre + "reduction.weight"].t()
    return outs


def _official_sd(model: SwinTransformer) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# =========================================================================== equivalence
@pytest.mark.parametrize("window,hw,batch", [(3, (38, 30), 1), (4, (61, 45), 2), (7, (64, 96), 1)])
def test_matches_independent_reference_fp64(window, hw, batch):
    """Covers padding to window multiples, odd patch-merging sizes, and padded sides of exactly one window (where
    the official Swin still shifts and masks, unlike torchvision's rule)."""
    model = _small(window_size=window).double().eval()
    _randomize(model, seed=window)
    x = torch.randn(batch, 3, *hw, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        ref = reference_swin(_official_sd(model), x, SMALL["depths"], SMALL["num_heads"], window, (1, 2, 3, 4))
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        assert (o - r).abs().max().item() < 1e-12


def test_gradients_match_reference_fp64():
    model = _small(window_size=3, out_indices=(2, 3)).double().train()
    _randomize(model, seed=3)
    x = torch.randn(1, 3, 37, 29, dtype=torch.float64)
    sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in model(x)).backward()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    ref = reference_swin(params, x, SMALL["depths"], SMALL["num_heads"], 3, (2, 3))
    sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in ref).backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.allclose(p.grad, params[k].grad, atol=1e-9, rtol=1e-7), k


def test_relative_position_index_is_official_layout():
    for ws in (3, 7, 12):
        attn = WindowAttention(8 * 2, ws, 0, 2)
        assert torch.equal(attn.relative_position_index.view(ws * ws, ws * ws), _ref_index(ws))
        assert "relative_position_index" not in attn.state_dict()  # derived, not persisted


def test_torchvision_attention_agrees_when_shift_is_active_and_differs_on_one_window_sides():
    """Documents the one numerical difference to torchvision's ``shifted_window_attention``."""
    torch.manual_seed(0)
    attn = WindowAttention(16, 4, 2, 2).double()
    _randomize(attn)

    def tv(x):
        return shifted_window_attention(x, attn.qkv.weight, attn.proj.weight, attn.get_relative_position_bias(),
                                        [4, 4], 2, [2, 2], qkv_bias=attn.qkv.bias, proj_bias=attn.proj.bias,
                                        training=False)

    with torch.no_grad():
        x = torch.randn(2, 11, 9, 16, dtype=torch.float64)  # padded 12 x 12: shift active in both
        assert (attn(x) - tv(x)).abs().max() < 1e-12
        x = torch.randn(2, 3, 9, 16, dtype=torch.float64)  # padded height 4 == window: torchvision drops the shift
        assert (attn(x) - tv(x)).abs().max() > 1e-3
        ref = _ref_attention(x, {k: v for k, v in attn.state_dict().items()}, "", 2, 4, 2)
        assert (attn(x) - ref).abs().max() < 1e-12


def test_shifted_window_mask_regions():
    m = shifted_window_mask(8, 8, 4, 2)
    assert m.shape == (4, 16, 16)
    assert set(m.unique().tolist()) == {0.0, -100.0}
    assert torch.all(m[0] == 0)  # top-left window holds no wrapped-around rows or columns
    assert (m[1] == 0).sum().item() == 2 * 8 * 8  # top-right: two column regions of 8 tokens
    assert (m[3] == 0).sum().item() == 4 * 4 * 4  # bottom-right: four regions of 4 tokens
    one = shifted_window_mask(4, 4, 4, 2)  # one-window map: the official code still masks the regions
    assert one.shape == (1, 16, 16) and (one[0] == 0).sum().item() == 4 * 4 * 4


def test_batch_elements_are_independent():
    model = _small(window_size=4).eval()
    _randomize(model)
    x = torch.randn(3, 3, 45, 53)
    with torch.no_grad():
        batched = model(x)
        single = [model(x[i:i + 1]) for i in range(3)]
    for lvl, o in enumerate(batched):
        for i in range(3):
            assert torch.allclose(o[i:i + 1], single[i][lvl], atol=1e-5, rtol=1e-5)


# =========================================================================== shapes
@pytest.mark.parametrize("arch", ["tiny", "small", "base"])
def test_arch_shapes_and_strides(arch):
    model = build_swin(SwinConfig(arch=arch, out_indices=(1, 2, 3, 4))).eval()
    dim, depths, heads = ARCHS[arch]
    assert model.out_channels == [dim, 2 * dim, 4 * dim, 8 * dim] and model.strides == [4, 8, 16, 32]
    assert [len(s.blocks) for s in model.layers] == list(depths)
    assert model.layers[2].blocks[0].attn.num_heads == heads[2] and model.window_size == 7
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in out] == [(1, c, 64 // s, 96 // s) for c, s in zip(model.out_channels,
                                                                                      model.strides)]


def test_swin_tiny_param_count_matches_official():
    model = build_swin(SwinConfig(arch="tiny", out_indices=(4,)))
    n = sum(p.numel() for p in model.parameters())
    # official Swin-T: 28.29M with the 1000-class head (768*1000 + 1000) and final norm (2*768); norm3 == that norm
    assert n == 28_288_354 - 769_000


@pytest.mark.parametrize("hw", [(33, 17), (65, 97), (1, 1), (100, 31)])
def test_odd_input_sizes(hw):
    model = _small(window_size=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
    assert [tuple(o.shape[2:]) for o in out] == [(math.ceil(hw[0] / s), math.ceil(hw[1] / s))
                                                 for s in (4, 8, 16, 32)]


def test_default_out_indices_and_unbuilt_stages():
    model = build_swin(SwinConfig())
    assert model.out_channels == [192, 384, 768] and model.strides == [8, 16, 32]
    assert not hasattr(model, "norm0") and hasattr(model, "norm3")
    m2 = _small(out_indices=(1, 2))
    assert len(m2.layers) == 2 and m2.layers[1].downsample is None and m2.layers[0].downsample is not None
    assert m2.out_channels == [16, 32] and m2.strides == [4, 8]


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        _small()(torch.randn(1, 4, 32, 32))


def test_autocast_bf16_cpu_runs():
    model = _small(window_size=4).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 40, 40))
    assert all(torch.isfinite(o.float()).all() for o in out)


@pytest.mark.slow
def test_swin_large_builds_forward_backward():
    model = build_swin(SwinConfig(arch="large", out_indices=(1, 2, 3, 4), with_cp=True))
    assert model.out_channels == [192, 384, 768, 1536] and model.window_size == 12
    assert abs(model.layers[3].blocks[1].drop_path.p - 0.3) < 1e-6
    n = sum(p.numel() for p in model.parameters())
    # official Swin-L (window 7, 1k head): 196,532,476; minus head (1,537,000) and final norm (3,072), plus the four
    # output norms (5,760) and the larger window-12 bias tables (564 heads x (23^2 - 13^2) = 203,040)
    assert n == 196_532_476 - 1_537_000 - 3_072 + 5_760 + 203_040
    model.train()
    out = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 192, 16, 16), (1, 384, 8, 8), (1, 768, 4, 4), (1, 1536, 2, 2)]
    sum(o.mean() for o in out).backward()
    assert model.patch_embed.proj.weight.grad is not None


# =========================================================================== freezing / checkpointing / drop path
@pytest.mark.parametrize("frozen,expect", [(-1, set()), (0, {"patch_embed"}),
                                           (1, {"patch_embed", "layers.0", "norm0"}),
                                           (2, {"patch_embed", "layers.0", "norm0", "layers.1", "norm1"}),
                                           (4, {"patch_embed", "layers", "norm0", "norm1", "norm2", "norm3"})])
def test_frozen_stages(frozen, expect):
    model = _small(frozen_stages=frozen, drop_path_rate=0.2)

    def is_frozen(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in expect)

    for name, p in model.named_parameters():
        assert p.requires_grad == (not is_frozen(name)), name
    model.train()
    for name, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, WindowAttention)):
            assert m.training == (not is_frozen(name)), name


def test_with_cp_identical_outputs_and_grads():
    a = _small(window_size=4, drop_path_rate=0.3, frozen_stages=0)
    _randomize(a)
    b = _small(window_size=4, drop_path_rate=0.3, frozen_stages=0, with_cp=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 45, 38)
    outs = []
    for m in (a, b):
        m.train()
        torch.manual_seed(123)
        out = m(x)
        sum(o.square().mean() for o in out).backward()
        outs.append(out)
    for oa, ob in zip(*outs):
        assert torch.equal(oa, ob)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-5), n
    assert a.patch_embed.proj.weight.grad is None  # frozen patch embed


def test_drop_path_eval_identity_train_stochastic():
    a = _small(window_size=4, drop_path_rate=0.5)
    _randomize(a)
    b = _small(window_size=4, drop_path_rate=0.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 40, 40)
    a.eval(), b.eval()
    with torch.no_grad():
        assert all(torch.equal(oa, ob) for oa, ob in zip(a(x), b(x)))
        a.train()
        torch.manual_seed(0)
        o1 = a(x)
        torch.manual_seed(1)
        o2 = a(x)
    assert any(not torch.allclose(p, q) for p, q in zip(o1, o2))
    rates = [blk.drop_path.p for s in a.layers for blk in s.blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.5) < 1e-6 and rates == sorted(rates)


# =========================================================================== weights
def _to_imagenet_checkpoint(model: SwinTransformer) -> dict:
    """What the official ImageNet release holds: (N, N) index, attn_mask buffers, final norm, head; no norm{i}."""
    sd = {k: v for k, v in _official_sd(model).items() if not k.startswith("norm")}
    for s, stage in enumerate(model.layers):
        for b, blk in enumerate(stage.blocks):
            n = blk.attn.window ** 2
            sd[f"layers.{s}.blocks.{b}.attn.relative_position_index"] = _ref_index(blk.attn.window)
            if b % 2:
                sd[f"layers.{s}.blocks.{b}.attn_mask"] = torch.zeros(4, n, n)
    dim = model.embed_dim * 8
    sd.update({"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim), "head.weight": torch.zeros(10, dim),
               "head.bias": torch.zeros(10)})
    return {"model": sd}


def _official_to_mmdet(sd: dict) -> dict:
    """Official -> mmdet ``SwinTransformer`` layout, written from mmdet's module structure (PatchMerging uses
    ``nn.Unfold``: channel c*4 + kh*2 + kw; official concatenation: [x00, x10, x01, x11] blocks of C)."""
    out = {}
    for k, v in sd.items():
        nk = k
        if k.startswith("patch_embed.proj."):
            nk = k.replace("patch_embed.proj.", "patch_embed.projection.")
        elif k.startswith("layers."):
            nk = "stages." + k[len("layers."):]
            nk = nk.replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.")
            nk = nk.replace(".mlp.fc2.", ".ffn.layers.1.")
            if ".downsample." in k:
                c = v.shape[-1] // 4
                block_of = {0: 0, 1: 2, 2: 1, 3: 3}  # unfold position kh*2+kw -> official block
                if v.dim() == 2:
                    v = torch.stack([v[:, block_of[pos] * c:(block_of[pos] + 1) * c] for pos in range(4)], -1)
                    v = v.reshape(v.shape[0], 4 * c)
                else:
                    v = torch.stack([v[block_of[pos] * c:(block_of[pos] + 1) * c] for pos in range(4)], -1)
                    v = v.reshape(4 * c)
        out["backbone." + nk] = v.clone()
    return out


def test_mmdet_unfold_patch_merging_equals_converted_official():
    """mmdet's merging (Unfold -> LayerNorm -> Linear) with its weights == ours with the converted weights."""
    torch.manual_seed(0)
    c = 6
    w_m, g_m, b_m = torch.randn(2 * c, 4 * c), 1 + torch.randn(4 * c), torch.randn(4 * c)
    x = torch.randn(2, 5, 7, c)
    xp = F.pad(x, (0, 0, 0, 1, 0, 1)).permute(0, 3, 1, 2)
    unf = F.unfold(xp, kernel_size=2, stride=2).transpose(1, 2)  # B, L, C*4
    ref = F.linear(F.layer_norm(unf, (4 * c,), g_m, b_m), w_m).view(2, 3, 4, 2 * c)
    mapped = official_swin_key_map({"stages.0.downsample.reduction.weight": w_m,
                                    "stages.0.downsample.norm.weight": g_m, "stages.0.downsample.norm.bias": b_m})
    model = _small(embed_dim=c, num_heads=(1, 1, 1, 1), out_indices=(1, 2))
    merge = model.layers[0].downsample
    with torch.no_grad():
        merge.reduction.weight.copy_(mapped["layers.0.downsample.reduction.weight"])
        merge.norm.weight.copy_(mapped["layers.0.downsample.norm.weight"])
        merge.norm.bias.copy_(mapped["layers.0.downsample.norm.bias"])
        assert torch.allclose(merge(x), ref, atol=1e-5)


def test_load_official_imagenet_checkpoint(tmp_path):
    src = _small(window_size=4)
    _randomize(src)
    path = tmp_path / "swin_imagenet.pth"
    torch.save(_to_imagenet_checkpoint(src), path)
    cfg = SwinConfig(arch="tiny", **SMALL, window_size=4, out_indices=(1, 2, 3, 4), weights=path)
    model = build_swin(cfg)
    rep = model.load_report
    assert rep.layout == "official" and not rep.unexpected and not rep.resized
    assert rep.missing == [f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert {"head.weight", "norm.weight", "layers.0.blocks.1.attn_mask",
            "layers.0.blocks.0.attn.relative_position_index"} <= set(rep.ignored)
    assert rep.loaded == len(model.state_dict()) - 8
    assert "missing output norms keep their fresh initialisation" in str(rep)
    own, ref = model.state_dict(), src.state_dict()
    for k in own:
        if not k.startswith("norm"):
            assert torch.equal(own[k], ref[k]), k
        else:
            assert torch.equal(own[k], torch.ones_like(own[k]) if k.endswith("weight") else torch.zeros_like(own[k]))


def test_load_official_co_detr_checkpoint_and_partial_stages(tmp_path):
    src = _small(window_size=4)
    _randomize(src)
    ckpt = {"meta": {}, "state_dict": {**{f"backbone.{k}": v for k, v in src.state_dict().items()},
                                       "neck.convs.0.conv.weight": torch.zeros(1)}}
    path = tmp_path / "co_dino_swin.pth"
    torch.save(ckpt, path)
    model = build_swin(SwinConfig(**SMALL, window_size=4, out_indices=(1, 2, 3, 4), weights=path)).eval()
    assert model.load_report.loaded == len(model.state_dict()) and not model.load_report.missing
    x = torch.randn(1, 3, 48, 40)
    src.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), src(x)))
    part = build_swin(SwinConfig(**SMALL, window_size=4, out_indices=(2, 3), weights=path))
    rep = part.load_report
    assert "norm0.weight" in rep.ignored and "layers.3.blocks.0.attn.qkv.weight" in rep.ignored
    assert "layers.2.downsample.reduction.weight" in rep.ignored and not rep.unexpected and not rep.missing


def test_load_mmdet_checkpoint(tmp_path):
    src = _small(window_size=4)
    _randomize(src)
    path = tmp_path / "mmdet_swin.pth"
    torch.save({"state_dict": _official_to_mmdet(src.state_dict())}, path)
    model = build_swin(SwinConfig(**SMALL, window_size=4, out_indices=(1, 2, 3, 4), weights=path)).eval()
    rep = model.load_report
    assert rep.layout == "mmdet" and rep.loaded == len(model.state_dict()) and not rep.unexpected
    x = torch.randn(2, 3, 45, 58)
    src.eval()
    with torch.no_grad():
        for a, b in zip(model(x), src(x)):
            assert torch.equal(a, b)
    assert "mmdet layout" in str(rep)


def test_window_size_resizing_of_bias_tables(tmp_path):
    src = _small(window_size=12)
    _randomize(src)
    path = tmp_path / "swin_w12.pth"
    torch.save(_to_imagenet_checkpoint(src), path)
    model = build_swin(SwinConfig(**SMALL, window_size=7, out_indices=(1, 2, 3, 4), weights=path))
    rep = model.load_report
    tables = [k for k in model.state_dict() if k.endswith("relative_position_bias_table")]
    assert sorted(rep.resized) == sorted(tables) and len(tables) == 8
    t = model.layers[1].blocks[1].attn.relative_position_bias_table
    assert t.shape == (13 * 13, 2)
    expect = F.interpolate(src.layers[1].blocks[1].attn.relative_position_bias_table.detach().t().reshape(1, 2, 23, 23),
                           size=(13, 13), mode="bicubic", align_corners=False).reshape(2, 169).t()
    assert torch.allclose(t, expect)
    # centre (zero offset) entry follows the source centre; constant tables stay constant
    const = torch.full((23 * 23, 3), 0.7)
    assert torch.allclose(resize_relative_position_bias_table(const, 7), torch.full((169, 3), 0.7), atol=1e-6)
    same = torch.randn(49, 2)
    assert torch.equal(resize_relative_position_bias_table(same, 4), same)
    # the resized model runs
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 70, 50))


def test_wrong_arch_and_bad_index_rejected():
    sd = _small(window_size=4).state_dict()
    with pytest.raises(ValueError, match="shape"):
        _small(window_size=4, embed_dim=32).load_pretrained(sd)
    with pytest.raises(ValueError, match="missing"):
        _small(window_size=4, depths=(2, 2, 4, 2)).load_pretrained(sd)
    bad = dict(sd)
    idx = _ref_index(4).flip(1)
    bad["layers.0.blocks.0.attn.relative_position_index"] = idx
    with pytest.raises(ValueError, match="relative position index"):
        _small(window_size=4).load_pretrained(bad)


def test_missing_weights_file_error_explains_download(tmp_path):
    path = tmp_path / "nope" / "swin_large_patch4_window12_384_22k.pth"
    with pytest.raises(FileNotFoundError) as exc:
        build_swin(SwinConfig(arch="large", weights=path))
    msg = str(exc.value)
    assert str(path) in msg and "never downloads" in msg
    assert ("https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
            "swin_large_patch4_window12_384_22k.pth") in msg


# =========================================================================== config / registry
def test_config_presets_and_validation():
    cfg = SwinConfig.model_validate({"type": "swin", "arch": "large", "out_indices": [1, 2, 3, 4]})
    r = cfg.resolved()
    assert r == {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "window_size": 12,
                 "drop_path_rate": 0.3}
    assert SwinConfig(arch="base").resolved()["window_size"] == 7
    over = SwinConfig(arch="base", window_size=12, drop_path_rate=0.4, depths=[2, 2, 6, 2]).resolved()
    assert over["window_size"] == 12 and over["drop_path_rate"] == 0.4 and over["depths"] == (2, 2, 6, 2)
    for bad in ({"out_indices": [0, 1]}, {"out_indices": [3, 2]}, {"arch": "huge"}, {"frozen_stages": 5},
                {"embed_dim": 100}, {"depths": [2, 2, 2]}, {"window_size": 0}, {"drop_path_rate": 1.0},
                {"use_checkpoint": True}):
        with pytest.raises(ValidationError):
            SwinConfig.model_validate({"type": "swin", **bad})


def test_component_through_registry():
    reg = Registry()
    reg._scanned = True
    reg.register("backbones", "swin", COMPONENT)
    cfg = reg.validate("backbones", {"type": "swin", "arch": "tiny", "out_indices": [1, 2, 3, 4]})
    model = reg.build("backbones", cfg)
    assert isinstance(model, SwinTransformer) and model.out_channels == [96, 192, 384, 768]


def test_entry_point_target_resolves():
    """The line to add to pyproject.toml under [project.entry-points."codetr.backbones"]."""
    from importlib import metadata

    ep = metadata.EntryPoint(name="swin", value="codetr.backbones.swin:COMPONENT", group="codetr.backbones")
    assert ep.load() is COMPONENT
