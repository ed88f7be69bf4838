"""ChannelMapper neck (mmdet ``ChannelMapper`` semantics, as used by Deformable-DETR / Co-DETR / DINO).

Per backbone level ``i``: ``convs.i`` = Conv2d(C_i -> hidden_dim, k x k, no bias) + GroupNorm(32), no
activation. Then ``num_extra_levels`` extra levels: ``extra_convs.0`` = Conv2d(3x3, stride 2, pad 1, no
bias) + GN on the **raw last backbone map** (e.g. C5 with 512/2048 channels), ``extra_convs.j`` (j >= 1) on
the previous extra output. The conv has no bias because a norm follows (mmcv ``ConvModule`` ``bias='auto'``;
the official state dicts have ``neck.convs.0.conv.weight`` and ``neck.convs.0.gn.{weight,bias}`` only).

Submodule names equal mmdet's (``convs.{i}.conv``, ``convs.{i}.gn``, ``extra_convs.{j}.conv``,
``extra_convs.{j}.gn``), so :func:`official_channel_mapper_key_map` only strips the ``neck.`` prefix.

Init (no weights loaded): xavier-uniform conv weights, GN weight 1 / bias 0 -- the values the official
Co-Deformable-DETR build produces (its ``init_stats.json``: conv weights uniform in
``+-sqrt(6 / (fan_in + fan_out))``).

``conv_bias: true`` gives every conv a bias *in front of* the GroupNorm. The original Deformable-DETR repository
and HuggingFace ``DeformableDetr`` (``input_proj.{i}.0.bias``) have that bias; a per-channel bias before GN is
not removed by the normalisation (it shifts each channel relative to its group's mean and changes the group
variance), so it cannot be folded into the conv weight or the GN affine: loading such checkpoints exactly
needs the option (see :mod:`codetr.convert.hf`). Zero-initialised when no weights are loaded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator
from torch import Tensor, nn

from codetr.core.registry import Component, ComponentConfig

__all__ = ["ChannelMapperConfig", "ChannelMapper", "build_channel_mapper", "official_channel_mapper_key_map",
           "COMPONENT"]


class ChannelMapperConfig(ComponentConfig):
    """ChannelMapper options.

    Attributes:
        hidden_dim: output channels of every level; injected from the recipe's ``hidden_dim``.
        num_extra_levels: extra stride-2 levels appended after the backbone levels (1 for the 4-level
            Deformable-DETR / Co-Deformable-DETR recipes with C3..C5; 1 for Co-DINO 5-scale with C2..C5).
        norm: "gn" (GroupNorm, the official setting; convs without bias) or "none" (convs with bias).
        norm_groups: GroupNorm groups (32).
        kernel_size: kernel of the per-level projection convs (1; odd sizes use "same" padding).
        conv_bias: conv bias; None = automatic (bias only without a norm, mmcv ``bias='auto'``, the official
            Co-DETR / mmdet layout); True = bias also in front of GN (original Deformable-DETR / HF layout).
    """

    type: Literal["channel_mapper"] = "channel_mapper"
    hidden_dim: int | None = None
    num_extra_levels: int = 1
    norm: Literal["gn", "none"] = "gn"
    norm_groups: int = 32
    kernel_size: int = 1
    conv_bias: bool | None = None

    @field_validator("num_extra_levels")
    @classmethod
    def _check_extra(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"num_extra_levels must be >= 0, got {v}")
        return v

    @field_validator("kernel_size")
    @classmethod
    def _check_kernel(cls, v: int) -> int:
        if v < 1 or v % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {v}")
        return v


class ConvNorm(nn.Module):
    """Conv2d followed by an optional GroupNorm (mmcv ``ConvModule`` without activation)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, norm: str, groups: int,
                 bias: bool | None = None) -> None:
        super().__init__()
        with_norm = norm == "gn"
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                              bias=(not with_norm) if bias is None else bias)
        self.gn = nn.GroupNorm(groups, out_ch) if with_norm else None
        nn.init.xavier_uniform_(self.conv.weight)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return self.gn(x) if self.gn is not None else x


class ChannelMapper(nn.Module):
    """Map L backbone maps to ``L + num_extra_levels`` maps of ``hidden_dim`` channels.

    Attributes:
        out_channels: ``hidden_dim`` per output level.
        out_strides: stride of each output level (input strides, then x2 per extra level).
    """

    def __init__(self, in_channels: list[int], in_strides: list[int] | None, hidden_dim: int,
                 num_extra_levels: int = 1, norm: str = "gn", norm_groups: int = 32, kernel_size: int = 1,
                 conv_bias: bool | None = None) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("ChannelMapper needs at least one input level")
        if in_strides is not None and len(in_strides) != len(in_channels):
            raise ValueError(f"in_strides has {len(in_strides)} entries but in_channels has {len(in_channels)}")
        if norm == "gn" and hidden_dim % norm_groups != 0:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by norm_groups {norm_groups}")
        self.in_channels = list(in_channels)
        self.hidden_dim = hidden_dim
        self.convs = nn.ModuleList(ConvNorm(c, hidden_dim, kernel_size, 1, norm, norm_groups, conv_bias)
                                   for c in in_channels)
        self.extra_convs = nn.ModuleList(
            ConvNorm(in_channels[-1] if j == 0 else hidden_dim, hidden_dim, 3, 2, norm, norm_groups, conv_bias)
            for j in range(num_extra_levels))
        n_out = len(in_channels) + num_extra_levels
        self.out_channels: list[int] = [hidden_dim] * n_out
        if in_strides is None:
            self.out_strides: list[int] | None = None
        else:
            self.out_strides = list(in_strides) + [in_strides[-1] * 2 ** (j + 1) for j in range(num_extra_levels)]
        self.strides = self.out_strides

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """Args: feats -- L maps (B, C_i, H_i, W_i). Returns L + extra maps (B, hidden_dim, H, W)."""
        if len(feats) != len(self.convs):
            raise ValueError(f"ChannelMapper built for {len(self.convs)} input levels, got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"input level {i}: expected (B, {c}, H, W), got {tuple(f.shape)}")
        outs = [conv(f) for conv, f in zip(self.convs, feats)]
        for j, conv in enumerate(self.extra_convs):
            outs.append(conv(feats[-1] if j == 0 else outs[-1]))
        return outs


def official_channel_mapper_key_map(state_dict: dict[str, Tensor], prefix: str = "neck.") -> dict[str, Tensor]:
    """Official / mmdet ``neck.*`` keys -> :class:`ChannelMapper` keys.

    mmdet names ``neck.convs.{i}.conv.weight``, ``neck.convs.{i}.gn.{weight,bias}``,
    ``neck.extra_convs.{j}.conv.weight``, ``neck.extra_convs.{j}.gn.{weight,bias}`` are ours with the
    ``neck.`` prefix, which is stripped; other keys are dropped. A dict without the prefix is returned as is.
    """
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def build_channel_mapper(cfg: ChannelMapperConfig, in_channels: list[int],
                         in_strides: list[int] | None = None) -> ChannelMapper:
    """Builder: ``in_channels`` / ``in_strides`` are the backbone's ``out_channels`` / ``strides``."""
    cfg.require_shared("hidden_dim")
    return ChannelMapper(list(in_channels), None if in_strides is None else list(in_strides), cfg.hidden_dim,
                         num_extra_levels=cfg.num_extra_levels, norm=cfg.norm, norm_groups=cfg.norm_groups,
                         kernel_size=cfg.kernel_size, conv_bias=cfg.conv_bias)


COMPONENT = Component(
    config=ChannelMapperConfig,
    build=build_channel_mapper,
    summary="ChannelMapper: 1x1 conv + GN(32) per level to hidden_dim, + stride-2 3x3 conv + GN extra levels",
)
