"""Multi-scale and single-scale adapters: shapes, strides, masks, key names (parity is in test_atss_parity)."""

from __future__ import annotations

import pytest
import torch

from codetr.core.interfaces import EncoderInputs, Memory
from codetr.heads.adapter import MultiScaleAdapter, SingleScaleAdapter, memory_masks, official_adapter_key_map

C = 32


def _levels(b=2, shapes=((16, 20), (8, 10), (4, 5), (2, 3))):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, C, h, w, generator=g) for h, w in shapes]


def test_multiscale_keys_and_init():
    a = MultiScaleAdapter(C, norm_groups=8)
    assert set(a.state_dict()) == {"downsample.0.weight", "downsample.0.bias", "downsample.1.weight",
                                   "downsample.1.bias"}
    assert official_adapter_key_map("query_head.downsample.1.bias") == "downsample.1.bias"
    assert official_adapter_key_map("query_head.transformer.level_embeds") is None
    bound = 1 / (C * 9) ** 0.5  # PyTorch default conv init, as official
    assert a.downsample[0].weight.abs().max() <= bound and a.downsample[0].bias.abs().max() <= bound


def test_multiscale_shapes_strides_and_masks():
    a = MultiScaleAdapter(C, norm_groups=8, num_extra=2)
    levels = _levels()
    image_mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    image_mask[1, :, 64:] = True  # image 1 is 128x64
    masks = [torch.nn.functional.interpolate(image_mask[None].float(), size=x.shape[-2:]).bool()[0] for x in levels]
    pyr = a(levels, masks, [8, 16, 32, 64])
    assert pyr.strides == [8, 16, 32, 64, 128, 256]
    assert pyr.spatial_shapes == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]
    assert all(m.shape == (2, h, w) for m, (h, w) in zip(pyr.masks, pyr.spatial_shapes))
    assert all(m.dtype == torch.bool for m in pyr.masks)
    # nearest resize: level 3 (2x3) samples image columns 0, 53, 106 -> [F, F, T]
    assert pyr.masks[3][1].tolist() == [[False, False, True]] * 2
    # level 4 (1x2) derived from level 3 samples its columns 0, 1 -> all valid
    assert pyr.masks[4][1].tolist() == [[False, False]] and not pyr.masks[4][0].any()
    # with the image mask (the detector's rule): image columns 0, 80 -> [F, T]
    pyr2 = a(levels, masks, [8, 16, 32, 64], image_mask=image_mask)
    assert pyr2.masks[4][1].tolist() == [[False, True]] and pyr2.masks[5][1].tolist() == [[False]]
    # masks default to all-valid
    pyr3 = a(levels, None, [8, 16, 32, 64])
    assert not any(m.any() for m in pyr3.masks)
    with pytest.raises(ValueError):
        a(levels, None, [8, 16, 32])


def test_multiscale_from_memory():
    a = MultiScaleAdapter(C, norm_groups=8)
    levels = _levels(b=1)
    shapes = [tuple(x.shape[-2:]) for x in levels]
    mem = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1)
    pad = torch.zeros(1, mem.shape[1], dtype=torch.bool)
    pad[0, 5] = True
    inputs = EncoderInputs(mem, mem, pad, shapes, torch.tensor([0, 320, 400, 420]), torch.ones(1, 4, 2),
                           [8, 16, 32, 64])
    memory = Memory(mem, inputs)
    assert memory_masks(memory)[0][0, 0, 5]
    pyr = a.from_memory(memory)
    assert len(pyr) == 5 and pyr.strides[-1] == 128
    for x, y in zip(pyr.maps[:4], levels):
        torch.testing.assert_close(x, y)


def test_multiscale_gradients():
    a = MultiScaleAdapter(C, norm_groups=8)
    levels = [x.requires_grad_(True) for x in _levels()]
    pyr = a(levels, None, [8, 16, 32, 64])
    pyr.maps[-1].sum().backward()
    assert levels[-1].grad is not None and a.downsample[0].weight.grad is not None


@pytest.mark.parametrize("num_up,num_down", [(1, 2), (2, 2), (0, 1), (0, 0)])
def test_single_scale_shapes(num_up, num_down):
    a = SingleScaleAdapter(C, num_down=num_down, num_up=num_up, norm_groups=8)
    x = torch.randn(2, C, 8, 10)
    image_mask = torch.zeros(2, 256, 320, dtype=torch.bool)
    image_mask[0, 200:] = True
    pyr = a([x], None, [32], image_mask=image_mask)
    assert len(pyr) == num_up + 1 + num_down
    assert pyr.strides == [32 * 2 ** k for k in range(-num_up, num_down + 1)]
    exp_shapes = []
    for k in range(-num_up, num_down + 1):
        h, w = 8, 10
        if k < 0:
            h, w = h * 2 ** -k, w * 2 ** -k
        for _ in range(max(k, 0)):
            h, w = (h + 1) // 2, (w + 1) // 2
        exp_shapes.append((h, w))
    assert pyr.spatial_shapes == exp_shapes
    assert pyr.maps[num_up] is x
    assert all(m.shape[-2:] == torch.Size(s) and m.shape[0] == 2 for m, s in zip(pyr.masks, exp_shapes))
    assert all(p.shape[1] == C for p in pyr.maps)
    if num_up:
        assert pyr.masks[0][0, -1].all() and not pyr.masks[0][1].any()


def test_single_scale_uses_last_level_and_rejects_odd_stride():
    a = SingleScaleAdapter(C, num_down=1, num_up=1, norm_groups=8)
    levels = _levels(b=1)
    pyr = a(levels, None, [8, 16, 32, 64])
    assert pyr.strides == [32, 64, 128] and pyr.maps[1] is levels[-1]
    with pytest.raises(ValueError):
        SingleScaleAdapter(C, num_up=3, norm_groups=8)([levels[0]], None, [4])
