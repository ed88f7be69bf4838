"""ChannelMapper neck: official-fixture parity (backbone -> neck), key map, structure, config."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from codetr.backbones.resnet import ResNet
from codetr.core.registry import Registry
from codetr.necks.channel_mapper import (COMPONENT, ChannelMapper, ChannelMapperConfig, build_channel_mapper,
                                         official_channel_mapper_key_map)
from tests._reference import load_int8exact_state_dict, load_safetensors_state_dict, reference_dir

FEATURE_ATOL = 1e-4  # reference READMEs: "an absolute tolerance near 1e-4 for features"


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _neck(in_channels, in_strides, sd):
    neck = build_channel_mapper(ChannelMapperConfig(hidden_dim=256, num_extra_levels=1), in_channels, in_strides)
    missing, unexpected = neck.load_state_dict(official_channel_mapper_key_map(sd), strict=True)
    assert not missing and not unexpected
    return neck.eval()


@pytest.mark.parity
def test_parity_co_deformable_detr_official():
    d = reference_dir("co_deformable_detr_official_small")
    sd = load_safetensors_state_dict(d / "state_dict.safetensors")
    feats = torch.load(d / "features.pt")
    neck = _neck([128, 256, 512], [8, 16, 32], sd)
    assert neck.out_strides == [8, 16, 32, 64]
    backbone = ResNet(depth=18, out_indices=(2, 3, 4))
    backbone.load_pretrained(sd)
    backbone.eval()
    with torch.no_grad():
        from_stored = neck(feats["backbone"])  # neck alone, on the official backbone outputs
        end_to_end = neck(backbone(torch.load(d / "inputs.pt")["img"]))  # image -> backbone -> neck
    assert len(from_stored) == 4
    for a, b, r in zip(from_stored, end_to_end, feats["neck"]):
        assert _max_abs(a, r) <= FEATURE_ATOL
        assert _max_abs(b, r) <= FEATURE_ATOL


@pytest.mark.parity
def test_parity_deformable_detr_mmdet3():
    d = reference_dir("deformable_detr_refine_twostage_mmdet3_small")
    sd = load_int8exact_state_dict(d / "state_dict_int8exact_no_backbone.pt")
    ref = torch.load(d / "backbone_neck.pt")
    neck = _neck([128, 256, 512], [8, 16, 32], sd)
    with torch.no_grad():
        out = neck([ref[f"backbone_out_{i}"] for i in range(3)])
    for i, o in enumerate(out):
        assert _max_abs(o, ref[f"neck_out_{i}"]) <= FEATURE_ATOL


@pytest.mark.parity
def test_parity_co_dino_mmdet3_five_levels():
    d = reference_dir("co_dino_mmdet3_small")
    sd = load_int8exact_state_dict(d / "state_dict_int8exact.pt")
    ref = torch.load(d / "backbone_neck.pt")
    neck = _neck([64, 128, 256, 512], [4, 8, 16, 32], sd)
    assert neck.out_strides == [4, 8, 16, 32, 64]
    with torch.no_grad():
        out = neck([ref[f"backbone_out_{i}"] for i in range(4)])
    assert len(out) == 5
    for i, o in enumerate(out):
        assert _max_abs(o, ref[f"neck_out_{i}"]) <= FEATURE_ATOL


def test_state_dict_keys_match_official_names():
    """Every official neck key (and only those) exists in our module, with the same shape."""
    d = reference_dir("co_deformable_detr_official_small")
    shapes = json.loads((d / "state_dict_shapes.json").read_text())
    official = {k[len("neck."):]: tuple(v["shape"]) for k, v in shapes.items() if k.startswith("neck.")}
    neck = ChannelMapper([128, 256, 512], [8, 16, 32], 256, num_extra_levels=1)
    ours = {k: tuple(v.shape) for k, v in neck.state_dict().items()}
    assert ours == official


# --------------------------------------------------------------------------- structure
def test_structure_and_init():
    neck = ChannelMapper([64, 128], [8, 16], 64, num_extra_levels=2, norm_groups=32)
    assert neck.out_strides == [8, 16, 32, 64] and neck.out_channels == [64] * 4
    assert neck.convs[0].conv.bias is None and isinstance(neck.convs[0].gn, nn.GroupNorm)
    assert neck.extra_convs[0].conv.in_channels == 128 and neck.extra_convs[1].conv.in_channels == 64
    assert neck.extra_convs[0].conv.stride == (2, 2) and neck.extra_convs[0].conv.kernel_size == (3, 3)
    bound = (6.0 / (64 + 64)) ** 0.5  # xavier-uniform, 1x1 conv 64 -> 64
    assert neck.convs[0].conv.weight.abs().max() <= bound
    assert torch.all(neck.convs[0].gn.weight == 1) and torch.all(neck.convs[0].gn.bias == 0)
    out = neck([torch.randn(2, 64, 16, 20), torch.randn(2, 128, 8, 10)])
    assert [tuple(o.shape) for o in out] == [(2, 64, 16, 20), (2, 64, 8, 10), (2, 64, 4, 5), (2, 64, 2, 3)]


def test_first_extra_level_uses_raw_backbone_map():
    neck = ChannelMapper([8, 16], None, 32, num_extra_levels=1, norm_groups=8).eval()
    c3, c4 = torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)
    out = neck([c3, c4])
    assert torch.equal(out[2], neck.extra_convs[0](c4))
    assert neck.out_strides is None


def test_no_norm_variant_has_bias():
    neck = build_channel_mapper(ChannelMapperConfig(hidden_dim=32, norm="none", num_extra_levels=0), [16], [32])
    assert neck.convs[0].conv.bias is not None and neck.convs[0].gn is None
    assert neck.out_strides == [32]


def test_errors():
    neck = ChannelMapper([8, 16], [8, 16], 32, norm_groups=8)
    with pytest.raises(ValueError, match="2 input levels, got 1"):
        neck([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"expected \(B, 16, H, W\)"):
        neck([torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)])
    with pytest.raises(ValueError, match="hidden_dim not set"):
        build_channel_mapper(ChannelMapperConfig(), [8])
    with pytest.raises(ValueError, match="divisible"):
        ChannelMapper([8], None, 20, norm_groups=8)


def test_config_validation_and_registry():
    with pytest.raises(ValidationError):
        ChannelMapperConfig.model_validate({"type": "channel_mapper", "out_channels": 256})
    with pytest.raises(ValidationError):
        ChannelMapperConfig.model_validate({"type": "channel_mapper", "kernel_size": 2})
    reg = Registry()
    reg._scanned = True
    reg.register("necks", "channel_mapper", COMPONENT)
    cfg = reg.validate("necks", {"type": "channel_mapper", "hidden_dim": 64})
    neck = reg.build("necks", cfg, [128, 256], [8, 16])
    assert neck.out_strides == [8, 16, 32] and neck.out_channels == [64, 64, 64]


def test_key_map_strips_prefix_only():
    sd = {"neck.convs.0.conv.weight": torch.zeros(1), "backbone.conv1.weight": torch.zeros(1)}
    assert list(official_channel_mapper_key_map(sd)) == ["convs.0.conv.weight"]
    assert list(official_channel_mapper_key_map({"convs.0.conv.weight": torch.zeros(1)})) == ["convs.0.conv.weight"]
