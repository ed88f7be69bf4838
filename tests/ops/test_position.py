"""Sine positional encodings: explicit-formula checks and two-stage query parity (mmdet 3 Deformable-DETR)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from codetr.ops.position import SinePositionalEncoding, sine_box_embedding
from tests._reference import load_int8exact_state_dict, reference_dir


def _explicit_map_encoding(mask, num_feats, temperature, normalize, scale, eps, offset):
    """Per-pixel python-float formula (no tensor tricks)."""
    b, h, w = mask.shape
    out = torch.zeros(b, 2 * num_feats, h, w, dtype=torch.float64)
    for bi in range(b):
        valid = (~mask[bi]).long()
        ycum = valid.cumsum(0)
        xcum = valid.cumsum(1)
        for i in range(h):
            for j in range(w):
                y, x = float(ycum[i, j]), float(xcum[i, j])
                if normalize:
                    y = (y + offset) / (float(ycum[-1, j]) + eps) * scale
                    x = (x + offset) / (float(xcum[i, -1]) + eps) * scale
                for c in range(num_feats):
                    d = temperature ** (2 * (c // 2) / num_feats)
                    f = math.sin if c % 2 == 0 else math.cos
                    out[bi, c, i, j] = f(y / d)
                    out[bi, num_feats + c, i, j] = f(x / d)
    return out


@pytest.mark.parametrize("kw", [dict(temperature=10000, offset=-0.5), dict(temperature=20, offset=0.0),
                                dict(temperature=10000, normalize=False)])
def test_sine_positional_encoding_formula(kw):
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 5:] = True
    pe = SinePositionalEncoding(num_feats=8, **kw)
    got = pe(mask)
    assert got.shape == (2, 16, 5, 7) and got.dtype == torch.float32
    full = dict(num_feats=8, temperature=10000, normalize=True, scale=2 * math.pi, eps=1e-6, offset=0.0)
    full.update(kw)
    want = _explicit_map_encoding(mask, **full)
    # fully padded columns/rows give (0 + offset) / eps: huge sin arguments where only fp32 noise differs
    valid = (~mask)[:, None].expand_as(got)
    assert (got.double() - want)[valid].abs().max().item() < 2e-5
    assert torch.isfinite(got).all()


def test_sine_positional_encoding_valid_region_is_normalised():
    """With padding, the last *valid* row/column reaches (count + offset) / count * scale."""
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[0, :, 4:] = True
    pe = SinePositionalEncoding(num_feats=2, temperature=10000, offset=0.0)
    out = pe(mask)
    # channel num_feats (x, sin, dim_t=1) at the last valid column = sin(2pi * 4/(4+eps))
    assert out[0, 2, 0, 3].item() == pytest.approx(math.sin(2 * math.pi * 4 / (4 + 1e-6)), abs=1e-5)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        pe(mask[0])


def test_sine_box_embedding_formula_and_orders():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(3, 5, 4, generator=g, dtype=torch.float64)
    nf = 6
    emb = sine_box_embedding(boxes, num_feats=nf)
    assert emb.shape == (3, 5, 4 * nf) and emb.dtype == torch.float64
    for k in range(4):
        for c in range(nf):
            d = 10000 ** (2 * (c // 2) / nf)
            f = torch.sin if c % 2 == 0 else torch.cos
            assert torch.allclose(emb[..., k * nf + c], f(boxes[..., k] * 2 * math.pi / d), atol=1e-12)
    dino = sine_box_embedding(boxes, num_feats=nf, order="yxwh")
    blocks = emb.view(3, 5, 4, nf)
    assert torch.equal(dino.view(3, 5, 4, nf), blocks[:, :, [1, 0, 2, 3]])
    pts = boxes[..., :2]
    assert torch.equal(sine_box_embedding(pts, num_feats=nf), emb[..., :2 * nf])
    assert torch.equal(sine_box_embedding(pts, num_feats=nf, order="yxwh").view(3, 5, 2, nf),
                       blocks[:, :, [1, 0]])
    assert sine_box_embedding(boxes.float().bfloat16(), num_feats=nf).dtype == torch.float32
    with pytest.raises(ValueError, match="got 3"):
        sine_box_embedding(boxes[..., :3])
    with pytest.raises(ValueError, match="order"):
        sine_box_embedding(boxes, order="xy")


@pytest.mark.parity
def test_two_stage_query_parity_deformable_detr_mmdet3():
    """query_pos, query = split(LN(Linear(sine_box_embedding(sigmoid(topk_coords_unact)))))."""
    d = reference_dir("deformable_detr_refine_twostage_mmdet3_small")
    sd = load_int8exact_state_dict(d / "state_dict_int8exact_no_backbone.pt")
    enc = torch.load(d / "encoder.pt")
    dec = torch.load(d / "decoder_outputs.pt")
    idx = enc["topk_indices"][0]
    unact = enc["enc_outputs_coord_unact"][0, idx][None]  # (1, 100, 4)
    fc = nn.Linear(512, 512)
    norm = nn.LayerNorm(512)
    fc.load_state_dict({"weight": sd["pos_trans_fc.weight"], "bias": sd["pos_trans_fc.bias"]})
    norm.load_state_dict({"weight": sd["pos_trans_norm.weight"], "bias": sd["pos_trans_norm.bias"]})
    with torch.no_grad():
        out = norm(fc(sine_box_embedding(unact.sigmoid(), num_feats=128, temperature=10000, order="xywh")))
    query_pos, query = out.split(256, dim=-1)
    assert (query_pos - dec["decoder_query_pos_in"]).abs().max().item() <= 1e-4
    assert (query - dec["decoder_query_in"]).abs().max().item() <= 1e-4
    assert torch.allclose(unact.sigmoid(), dec["decoder_init_reference_sigmoid"], atol=1e-6)
