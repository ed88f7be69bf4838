"""Shared anchor generator and DeltaXYWH coder (MMDetection semantics)."""

from __future__ import annotations

import math

import pytest
import torch

from codetr.heads.anchors import AnchorGenerator, anchor_inside_flags, valid_flags_from_mask
from codetr.heads.box_coder import DeltaXYWHCoder
from tests._reference import reference_dir

SHAPES = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]


def test_atss_anchor_layout_hand_computed():
    gen = AnchorGenerator([8, 16], octave_base_scale=8, scales_per_octave=1, ratios=[1.0])
    a = gen.grid_anchors([(2, 3), (1, 1)])
    assert [x.shape[0] for x in a] == [6, 1]
    # side 64 centred on (x*8, y*8): location (y=1, x=2) is index 1*3+2 = 5
    assert a[0][0].tolist() == [-32, -32, 32, 32]
    assert a[0][5].tolist() == [16 - 32, 8 - 32, 16 + 32, 8 + 32]
    assert a[1][0].tolist() == [-64, -64, 64, 64]
    assert gen.num_base_anchors == 1


def test_rpn_anchor_order_ratio_major():
    gen = AnchorGenerator([8], octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1.0, 2.0])
    base = gen.base_anchors(0)
    assert base.shape == (9, 4)
    w = base[:, 2] - base[:, 0]
    h = base[:, 3] - base[:, 1]
    scales = [4 * 2 ** (k / 3) for k in range(3)]
    for r_i, r in enumerate([0.5, 1.0, 2.0]):
        for s_i, s in enumerate(scales):
            a = r_i * 3 + s_i
            assert w[a].item() == pytest.approx(8 * s / math.sqrt(r), rel=1e-6)
            assert h[a].item() == pytest.approx(8 * s * math.sqrt(r), rel=1e-6)
    a = gen.grid_anchors([(2, 2)])[0]
    assert a.shape == (36, 4)
    torch.testing.assert_close(a[9:18], base + torch.tensor([8.0, 0, 8, 0]))  # location (0, 1)


def test_center_offset():
    gen = AnchorGenerator([16], octave_base_scale=1, ratios=[1.0], center_offset=0.5)
    assert gen.grid_anchors([(1, 1)])[0].tolist() == [[0, 0, 16, 16]]
    with pytest.raises(ValueError):
        AnchorGenerator([16], center_offset=1.5)
    with pytest.raises(ValueError):
        gen.grid_anchors([(1, 1), (1, 1)])


def test_valid_flags_ceil_rule():
    gen = AnchorGenerator([8, 32], octave_base_scale=4, scales_per_octave=1, ratios=[0.5, 1.0])
    v = gen.valid_flags([(4, 5), (1, 2)], (20, 33))  # valid (ceil(20/8), ceil(33/8)) = (3, 5); (1, 2)
    assert v[0].shape == (4 * 5 * 2,)
    grid = v[0].view(4, 5, 2)
    assert grid[:3].all() and not grid[3].any()
    assert (grid[:, :, 0] == grid[:, :, 1]).all()
    assert v[1].all()
    v2 = gen.valid_flags([(4, 5), (1, 2)], torch.tensor([8, 8]))
    assert v2[0].view(4, 5, 2)[:1, :1].all() and v2[0].sum() == 2 and v2[1].view(1, 2, 2)[0, 1].sum() == 0
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[3] = True
    assert torch.equal(valid_flags_from_mask(mask, 2), v[0])


def test_anchor_inside_flags():
    anchors = torch.tensor([[-1.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 21, 10]])
    valid = torch.tensor([True, True, True])
    assert anchor_inside_flags(anchors, valid, (20, 20), -1).tolist() == [True, True, True]
    assert anchor_inside_flags(anchors, valid, (20, 20), 0).tolist() == [False, True, False]
    assert anchor_inside_flags(anchors, valid, (20, 20), 2).tolist() == [True, True, True]


@pytest.mark.parity
def test_anchors_match_official_fixtures():
    d = reference_dir("co_deformable_detr_official_small")
    atss = torch.load(d / "atss.pt")["anchors_per_level"]
    rpn = torch.load(d / "rpn.pt")["anchors_per_level"]
    ours = AnchorGenerator([8, 16, 32, 64, 128], 8, 1, [1.0]).grid_anchors(SHAPES)
    for x, y in zip(ours, atss):
        assert torch.equal(x, y)
    ours = AnchorGenerator([8, 16, 32, 64, 128], 4, 3, [0.5, 1.0, 2.0]).grid_anchors(SHAPES)
    for x, y in zip(ours, rpn):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- coder
def test_encode_hand_computed_and_roundtrip():
    c = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    anchors = torch.tensor([[0.0, 0, 10, 20]])
    gt = torch.tensor([[2.0, 4, 22, 24]])
    d = c.encode(anchors, gt)
    # centre (5,10) -> (12,14): dx = 7/10/0.1, dy = 4/20/0.1; dw = log(20/10)/0.2, dh = log(20/20)/0.2
    torch.testing.assert_close(d, torch.tensor([[7.0, 2.0, math.log(2) / 0.2, 0.0]]))
    torch.testing.assert_close(c.decode(anchors, d), gt)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    a = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 50], 1)
    xy2 = torch.rand(50, 2, generator=g) * 100
    b = torch.cat([xy2, xy2 + 5 + torch.rand(50, 2, generator=g) * 50], 1)
    coder = DeltaXYWHCoder(means=(0.1, -0.1, 0.0, 0.05), stds=(0.5, 0.5, 1, 1))
    torch.testing.assert_close(coder.decode(a, coder.encode(a, b)), b, atol=1e-4, rtol=0)


def test_decode_wh_ratio_clip_and_border_clip():
    c = DeltaXYWHCoder()
    anchors = torch.tensor([[0.0, 0, 10, 10]])
    out = c.decode(anchors, torch.tensor([[0.0, 0, 100, -100]]))
    m = math.exp(abs(math.log(16 / 1000)))  # 62.5
    torch.testing.assert_close(out, torch.tensor([[5 - 5 * m, 5 - 5 / m, 5 + 5 * m, 5 + 5 / m]]))
    clipped = c.decode(anchors, torch.tensor([[0.0, 0, 100, -100]]), max_shape=(40, 30))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 5 - 5 / m, 30, 5 + 5 / m]]))
    no_clip = DeltaXYWHCoder(clip_border=False).decode(anchors, torch.tensor([[0.0, 0, 100, -100]]), (40, 30))
    torch.testing.assert_close(no_clip, out)


def test_decode_ctr_clamp():
    c = DeltaXYWHCoder(add_ctr_clamp=True, ctr_clamp=32)
    anchors = torch.tensor([[0.0, 0, 100, 100]])
    out = c.decode(anchors, torch.tensor([[1.0, -1.0, -10.0, 10.0]]))
    # centre shift clamped to +-32 px; dw lower bound NOT clamped, upper bound clamped to log(62.5)
    wmin = 100 * math.exp(-10)
    hmax = 100 * 62.5
    torch.testing.assert_close(out, torch.tensor([[82 - wmin / 2, 18 - hmax / 2, 82 + wmin / 2, 18 + hmax / 2]]))


def test_decode_class_specific_and_batched():
    c = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 25, 45]])
    deltas = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    out = c.decode(anchors, deltas)
    assert out.shape == (2, 12)
    for k in range(3):
        torch.testing.assert_close(out[:, 4 * k:4 * k + 4], c.decode(anchors, deltas[:, 4 * k:4 * k + 4]))
    batched = c.decode(anchors, torch.stack([deltas[:, :4], deltas[:, 4:8]]))
    assert batched.shape == (2, 2, 4)
    torch.testing.assert_close(batched[1], c.decode(anchors, deltas[:, 4:8]))
    assert c.decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    with pytest.raises(ValueError):
        c.decode(anchors, torch.zeros(2, 5))
