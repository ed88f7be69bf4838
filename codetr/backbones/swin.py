"""Swin Transformer (v1) backbone, T/S/B/L, with the numerics of the official *detection* Swin.

One concept in ~590 lines: config, window attention (ours, for the official shift semantics), blocks/stages and
weight loading belong together; the checkpoint key layouts live in :mod:`codetr.backbones.swin_weights`.

Architecture and state-dict layout follow the official Swin detection backbone (Swin-Transformer-Object-Detection,
which Co-DETR copies as ``SwinTransformerV1``)::

    patch_embed.proj / patch_embed.norm                          4x4 patch conv + LayerNorm
    layers.{s}.blocks.{b}.norm1 / attn.qkv / attn.proj / attn.relative_position_bias_table / norm2 / mlp.fc1 / mlp.fc2
    layers.{s}.downsample.reduction / .norm                      patch merging after stage s+1 (s = 0..2)
    norm{i}                                                      output LayerNorm of stage i+1, one per out index

so the ``backbone.*`` keys of official Co-DETR Swin checkpoints and the ``model`` dict of the official ImageNet
Swin checkpoints (``swin_large_patch4_window12_384_22k.pth`` ...) load by name. mmdet's ``SwinTransformer`` layout
(``stages.*``, ``attn.w_msa.*``, ``ffn.layers.*``, ``patch_embed.projection``; patch-merging weights in
``nn.Unfold`` channel order) is converted by :func:`official_swin_key_map`. A relative position bias table trained
with another window size is resized bicubically (what mmdet and the official repo do), e.g. 384-px / window-12
weights into a window-7 model.

Building blocks taken from torchvision (``torchvision.models.swin_transformer``): ``ShiftedWindowAttention`` (its
``qkv``/``proj`` linears, ``relative_position_bias_table`` and ``relative_position_index``, whose layout is the
official one: index ``(dh + Wh - 1) * (2 Ww - 1) + (dw + Ww - 1)``; the stored index of a loaded checkpoint is
compared with ours), ``PatchMerging`` (same ``x0, x1, x2, x3`` concatenation order and odd-size padding as the
official one) and ``StochasticDepth`` ("row" mode = the official per-sample ``DropPath``).

**torchvision vs official numerics.** torchvision's ``shifted_window_attention`` switches the cyclic shift off along a
side whose padded length is ``<= window`` (akin to the *classification* Swin, which drops the shift and shrinks
the window when the resolution is ``<= window``).
The official detection Swin and mmdet always shift odd blocks and mask the wrapped-around regions, also when a
padded side is exactly one window. The two differ whenever a stage's padded feature side is one window (e.g.
window 12: stage 4 for image sides <= 384 px, stage 3 for <= 192 px). The window attention forward is therefore
ours (:meth:`WindowAttention.forward`): pad to window multiples (after ``norm1``, zeros, as official), roll, window
partition, attention with relative position bias and the -100 shift mask, reverse, crop. It runs
``F.scaled_dot_product_attention`` with the bias (+ mask) as an additive float mask, so it computes exactly the
official softmax attention up to floating-point rounding (fp64: within ~5e-15 of an independent loop-by-window
reference implementation, ``tests/backbones/test_swin.py``; fp32: ~5e-7 relative to it), without materialising the
attention matrices where a fused kernel applies (CPU: inference only; with a bias that needs gradients PyTorch
falls back to the math kernel, which is the official computation). torchvision's MLP (``mlp.0``/``mlp.3``) is
replaced by an identical ``fc1``/GELU/``fc2`` module to keep the official names.

Arbitrary input sizes: the image is zero-padded on the right/bottom to a multiple of ``patch_size`` (as official and
mmdet), every attention pads its map to window multiples and crops back, patch merging pads odd sides. Output map
``i`` thus has ``ceil(H / s_i) x ceil(W / s_i)`` cells (s = 4, 8, 16, 32), like the ResNet backbone. (Padding the
input further, e.g. to a multiple of 32, would change the numerics: the official code does not.)

``frozen_stages`` follows mmdet (and the ResNet backbone): -1 nothing; 0 the patch embedding; ``k >= 1`` also stages
1..k (each with its patch merging) and their output norms. (The official Swin repo counts one higher: its
``frozen_stages=1`` is our 0.) Frozen modules get ``requires_grad=False`` and stay in eval mode (no drop path).

``with_cp`` checkpoints every block (``torch.utils.checkpoint``, non-reentrant, RNG state preserved so drop path
draws the same masks in the recomputation) while training: the official ``use_checkpoint``.

Initialisation without weights is the official one: Linear trunc-normal(0.02) / zero bias, LayerNorm 1 / 0, bias
tables trunc-normal(0.02). Pretrained weights come from a **local file only** (``weights``); nothing is downloaded.
ImageNet checkpoints have no output norms (``norm{i}``): those are reported missing and keep their fresh
initialisation, as in the official and mmdet detectors; any other missing tensor is an error.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import field_validator, model_validator
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging, ShiftedWindowAttention
from torchvision.ops import StochasticDepth

from codetr.backbones.common import FrozenStagesMixin, check_frozen_stages, check_out_indices
from codetr.backbones.resnet import LoadReport, load_state_dict_file
from codetr.backbones.swin_weights import (official_swin_key_map, resize_relative_position_bias_table,
                                           swin_key_from_official)
from codetr.core.registry import Component, ComponentConfig

__all__ = ["SwinConfig", "SwinTransformer", "SwinLoadReport", "WindowAttention", "SwinBlock", "SwinStage",
           "ARCHS", "build_swin", "official_swin_key_map", "swin_key_from_official", "resize_relative_position_bias_table",
           "shifted_window_mask", "COMPONENT"]

logger = logging.getLogger(__name__)

#: arch -> (embed_dim, depths, num_heads)
ARCHS: dict[str, tuple[int, tuple[int, int, int, int], tuple[int, int, int, int]]] = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
# Defaults when not given: the window of the usual ImageNet weights (T/S/B 224-px window 7; L: the 384-px window-12
# 22k weights of every Co-DETR Swin-L recipe) and the drop-path rate of the Co-DETR 1x recipes.
_DEFAULT_WINDOW = {"tiny": 7, "small": 7, "base": 7, "large": 12}
_DEFAULT_DROP_PATH = {"tiny": 0.2, "small": 0.2, "base": 0.2, "large": 0.3}

_RELEASE = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0"
_WEIGHT_FILES = {
    "tiny": ["swin_tiny_patch4_window7_224.pth"],
    "small": ["swin_small_patch4_window7_224.pth"],
    "base": ["swin_base_patch4_window7_224_22k.pth", "swin_base_patch4_window12_384_22k.pth"],
    "large": ["swin_large_patch4_window12_384_22k.pth", "swin_large_patch4_window7_224_22k.pth"],
}


# ============================================================================ config
class SwinConfig(ComponentConfig):
    """Swin Transformer backbone options.

    Attributes:
        arch: preset (embed_dim / depths / num_heads): tiny 96/[2,2,6,2]/[3,6,12,24], small 96/[2,2,18,2]/
            [3,6,12,24], base 128/[2,2,18,2]/[4,8,16,32], large 192/[2,2,18,2]/[6,12,24,48].
        embed_dim, depths, num_heads: explicit overrides of the preset.
        window_size: attention window (default 7 for tiny/small/base, 12 for large -- the window of
            ``swin_large_patch4_window12_384_22k.pth`` used by Co-DETR). Any size works; weights trained with
            another window get their relative position bias tables resized.
        patch_size: patch embedding size and stride (4).
        mlp_ratio: MLP hidden width / channels (4).
        drop_path_rate: stochastic depth rate of the last block, linear from 0 over all blocks (default 0.2;
            0.3 for large, as in the Co-DINO Swin-L 1x recipe; 0.5/0.6 for its 2x/3x recipes).
        out_indices: stages returned, 1..4 (strides 4, 8, 16, 32; channels C, 2C, 4C, 8C). Default (2, 3, 4);
            5-scale Co-DINO uses all four. Each returned stage has its output LayerNorm ``norm{i-1}``.
        frozen_stages: -1 none; 0 patch embedding; k >= 1 also stages 1..k (mmdet semantics).
        with_cp: activation checkpointing of every block during training.
        weights: local checkpoint (official ImageNet Swin ``model`` dict, official Co-DETR ``backbone.*``, or
            mmdet ``backbone.stages.*`` layout; ``.pth``/``.pt``/``.safetensors``). Never downloaded.
    """

    type: Literal["swin"] = "swin"
    arch: Literal["tiny", "small", "base", "large"] = "tiny"
    embed_dim: int | None = None
    depths: tuple[int, int, int, int] | None = None
    num_heads: tuple[int, int, int, int] | None = None
    window_size: int | None = None
    patch_size: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float | None = None
    out_indices: tuple[int, ...] = (2, 3, 4)
    frozen_stages: int = -1
    with_cp: bool = False
    weights: Path | None = None

    @field_validator("out_indices")
    @classmethod
    def _check_out_indices(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return check_out_indices(v, "strides 4..32", "mmdet's 0-based (0, 1, 2, 3) is (1, 2, 3, 4) here")

    @field_validator("frozen_stages")
    @classmethod
    def _check_frozen(cls, v: int) -> int:
        return check_frozen_stages(v, "patch embedding")

    @field_validator("embed_dim", "window_size", "patch_size")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("depths", "num_heads")
    @classmethod
    def _positive4(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and any(d < 1 for d in v):
            raise ValueError(f"all four entries must be >= 1, got {list(v)}")
        return v

    @field_validator("mlp_ratio")
    @classmethod
    def _check_mlp_ratio(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {v}")
        return v

    @field_validator("drop_path_rate")
    @classmethod
    def _check_dpr(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _check_heads(self) -> "SwinConfig":
        r = self.resolved()
        for s, heads in enumerate(r["num_heads"]):
            dim = r["embed_dim"] * 2 ** s
            if dim % heads:
                raise ValueError(f"stage {s + 1}: {dim} channels are not divisible by {heads} heads "
                                 f"(embed_dim={r['embed_dim']}, num_heads={list(r['num_heads'])})")
        return self

    def resolved(self) -> dict:
        """The architecture with the preset filled in: embed_dim, depths, num_heads, window_size,
        drop_path_rate."""
        dim, depths, heads = ARCHS[self.arch]
        return {
            "embed_dim": self.embed_dim if self.embed_dim is not None else dim,
            "depths": tuple(self.depths) if self.depths is not None else depths,
            "num_heads": tuple(self.num_heads) if self.num_heads is not None else heads,
            "window_size": self.window_size if self.window_size is not None else _DEFAULT_WINDOW[self.arch],
            "drop_path_rate": (self.drop_path_rate if self.drop_path_rate is not None
                               else _DEFAULT_DROP_PATH[self.arch]),
        }


# ============================================================================ building blocks
def shifted_window_mask(padded_h: int, padded_w: int, window: int, shift: int,
                        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive attention mask of the shifted windows: (num_windows, window^2, window^2), 0 or -100.

    After the cyclic shift by ``-shift``, each side splits into the regions ``[0, P - window)``,
    ``[P - window, P - shift)`` and ``[P - shift, P)`` (P = padded side); tokens attend only within the same pair
    of regions. Windows are numbered row-major, tokens row-major inside a window.
    """
    ys = torch.arange(padded_h, device=device)
    xs = torch.arange(padded_w, device=device)
    region_y = (ys >= padded_h - window).long() + (ys >= padded_h - shift).long()
    region_x = (xs >= padded_w - window).long() + (xs >= padded_w - shift).long()
    label = region_y[:, None] * 3 + region_x[None, :]  # (P_h, P_w)
    gh, gw = padded_h // window, padded_w // window
    label = label.view(gh, window, gw, window).permute(0, 2, 1, 3).reshape(gh * gw, window * window)
    different = label[:, :, None] != label[:, None, :]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill_(different, -100.0)


class WindowAttention(ShiftedWindowAttention):
    """(Shifted) window multi-head self-attention with relative position bias, official detection-Swin semantics.

    Parameters and the relative position index come from torchvision's ``ShiftedWindowAttention`` (official names
    ``qkv``, ``proj``, ``relative_position_bias_table``); the index buffer is not persistent (it is derived).
    Input and output (B, H, W, C) for any H, W.
    """

    def __init__(self, dim: int, window_size: int, shift_size: int, num_heads: int) -> None:
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        super().__init__(dim, [window_size, window_size], [shift_size, shift_size], num_heads)
        index = self.relative_position_index
        del self._buffers["relative_position_index"]
        self.register_buffer("relative_position_index", index, persistent=False)

    @property
    def window(self) -> int:
        return self.window_size[0]

    @property
    def shift(self) -> int:
        return self.shift_size[0]

    def relative_bias(self) -> Tensor:
        """(num_heads, window^2, window^2) bias gathered from the table."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Args: x (B, H, W, C) normed tokens; mask: :func:`shifted_window_mask` of the padded map (computed here
        when None and the block is shifted). Returns (B, H, W, C)."""
        B, H, W, C = x.shape
        ws, shift, heads = self.window, self.shift, self.num_heads
        hd = C // heads
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        gh, gw = Hp // ws, Wp // ws
        nw, n = gh * gw, ws * ws
        win = x.view(B, gh, ws, gw, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, nw, n, C)
        qkv = self.qkv(win).view(B, nw, n, 3, heads, hd).permute(3, 0, 1, 4, 2, 5)  # 3, B, nw, heads, n, hd
        bias = self.relative_bias().to(qkv.dtype)
        if shift:
            if mask is None:
                mask = shifted_window_mask(Hp, Wp, ws, shift, device=x.device, dtype=qkv.dtype)
            # per (window, head) bias; broadcast over the batch without copying it
            attn_bias = (mask.to(qkv.dtype)[:, None] + bias[None]).reshape(1, nw * heads, n, n)
            q, k, v = qkv.reshape(3, B, nw * heads, n, hd).unbind(0)
        else:
            attn_bias = bias[None]
            q, k, v = qkv.reshape(3, B * nw, heads, n, hd).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # scale head_dim ** -0.5
        out = out.reshape(B, nw, heads, n, hd).transpose(2, 3).reshape(B, nw, n, C)
        out = self.proj(out)
        out = out.view(B, gh, gw, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        if pad_b or pad_r:
            out = out[:, :H, :W]
        return out


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (torchvision's MLP without dropout, official parameter names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm Swin block: ``x + dp(attn(norm1(x)))``, then ``x + dp(mlp(norm2(x)))``. Tokens (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, shift_size, num_heads)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """``blocks`` (alternating shift 0 / window // 2) and the optional ``downsample`` (patch merging).

    ``forward`` returns (stage output before merging, input of the next stage)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_paths: list[float], downsample: bool) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if b % 2 == 0 else self.shift_size, mlp_ratio, drop_paths[b])
            for b in range(depth))
        self.downsample = PatchMerging(dim, nn.LayerNorm) if downsample else None
        self.with_cp = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mask = None
        if self.shift_size > 0 and len(self.blocks) > 1:
            ws = self.window_size
            hp, wp = math.ceil(x.shape[1] / ws) * ws, math.ceil(x.shape[2] / ws) * ws
            mask = shifted_window_mask(hp, wp, ws, self.shift_size, device=x.device)
        for i, blk in enumerate(self.blocks):
            m = mask if i % 2 == 1 else None
            if (self.with_cp and self.training and torch.is_grad_enabled()
                    and (x.requires_grad or any(p.requires_grad for p in blk.parameters()))):
                x = torch.utils.checkpoint.checkpoint(blk, x, m, use_reentrant=False)
            else:
                x = blk(x, m)
        out = x
        if self.downsample is not None:
            x = self.downsample(x)
        return out, x


class PatchEmbed(nn.Module):
    """Zero-pad (right/bottom) to a multiple of the patch, ``proj`` conv with stride = patch, LayerNorm ``norm``.
    (B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), C)."""

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        pad_b, pad_r = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


# ============================================================================ backbone
@dataclass
class SwinLoadReport(LoadReport):
    """:class:`~codetr.backbones.resnet.LoadReport` plus the checkpoint layout and the resized bias tables.
    ``missing`` lists tensors left at their initialisation (only output norms; anything else raises)."""

    layout: str = "official"
    resized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.layout} layout", super().__str__()]
        if self.resized:
            parts.append(f"resized {len(self.resized)} relative position bias tables to the model's window")
        if self.missing:
            parts.append("missing output norms keep their fresh initialisation")
        return "; ".join(parts)


class SwinTransformer(FrozenStagesMixin, nn.Module):
    """Swin Transformer trunk returning the (output-normed) maps of ``out_indices``, NCHW.

    Attributes:
        out_channels: channels of each returned map (e.g. [192, 384, 768, 1536] for Swin-L with all stages).
        strides: stride of each returned map in input pixels (e.g. [4, 8, 16, 32]).
        load_report: :class:`SwinLoadReport` of the pretrained weights, or None.
    """

    def __init__(self, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7, patch_size: int = 4,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.2, out_indices: tuple[int, ...] = (2, 3, 4),
                 frozen_stages: int = -1, with_cp: bool = False) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError("depths and num_heads need four entries (one per stage)")
        if not out_indices or any(i not in (1, 2, 3, 4) for i in out_indices):
            raise ValueError(f"out_indices {list(out_indices)}: stage indices are 1..4")
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.window_size = window_size
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.num_stages = max(self.out_indices)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        # drop path grows linearly over all blocks of the full network (also when trailing stages are not built)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for s in range(self.num_stages):
            start = sum(depths[:s])
            self.layers.append(SwinStage(embed_dim * 2 ** s, depths[s], num_heads[s], window_size, mlp_ratio,
                                         dpr[start:start + depths[s]], downsample=s + 1 < self.num_stages))
        for i in self.out_indices:
            self.add_module(f"norm{i - 1}", nn.LayerNorm(embed_dim * 2 ** (i - 1)))
        self.out_channels: list[int] = [embed_dim * 2 ** (i - 1) for i in self.out_indices]
        self.strides: list[int] = [patch_size * 2 ** (i - 1) for i in self.out_indices]
        self.load_report: SwinLoadReport | None = None
        self.with_cp = with_cp
        self._init_weights()
        self._freeze_stages()

    @property
    def with_cp(self) -> bool:
        return self._with_cp

    @with_cp.setter
    def with_cp(self, value: bool) -> None:
        self._with_cp = bool(value)
        for stage in self.layers:
            stage.with_cp = self._with_cp

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    # ----------------------------------------------------------------- freezing
    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        if self.frozen_stages >= 0:
            mods.append(self.patch_embed)
        for s in range(1, min(self.frozen_stages, self.num_stages) + 1):
            mods.append(self.layers[s - 1])
            if s in self.out_indices:
                mods.append(getattr(self, f"norm{s - 1}"))
        return mods

    # ----------------------------------------------------------------- forward
    def forward(self, images: Tensor) -> list[Tensor]:
        """Args: images (B, 3, H, W) normalised RGB, any H, W. Returns one (B, C_i, ceil(H/s_i), ceil(W/s_i))
        map per out index."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = self.patch_embed(images)
        outs = []
        for s, stage in enumerate(self.layers, start=1):
            out, x = stage(x)
            if s in self.out_indices:
                outs.append(getattr(self, f"norm{s - 1}")(out).permute(0, 3, 1, 2).contiguous())
        return outs

    # ----------------------------------------------------------------- weights
    def _ignorable(self, key: str) -> bool:
        """Checkpoint tensors that have no counterpart by design."""
        if key.startswith(("head.", "norm.")) or key.endswith((".attn_mask", "relative_position_index")):
            return True  # classifier, classification final norm, buffers we derive
        m = re.match(r"layers\.(\d+)\.(downsample\.)?", key)
        if m is not None:
            s = int(m.group(1)) + 1
            return s > self.num_stages or (m.group(2) is not None and s >= self.num_stages)
        m = re.match(r"norm(\d+)\.", key)
        return m is not None and int(m.group(1)) + 1 not in self.out_indices

    def load_pretrained(self, state_dict: dict[str, Tensor], source: str = "<state dict>") -> SwinLoadReport:
        """Load an official (ImageNet ``model`` dict or Co-DETR ``backbone.*``) or mmdet Swin state dict.

        Keys are mapped by :func:`official_swin_key_map`; bias tables of another window size are resized
        bicubically. Raises on mis-shaped tensors and on missing tensors other than the output norms."""
        mapped, layout = official_swin_key_map(state_dict, return_layout=True)
        own = self.state_dict()
        report = SwinLoadReport(source=source, layout=layout)
        usable: dict[str, Tensor] = {}
        for k, v in mapped.items():
            if k in own:
                if k.endswith("relative_position_bias_table") and v.dim() == 2 and own[k].dim() == 2 \
                        and v.shape != own[k].shape and v.shape[1] == own[k].shape[1]:
                    v = resize_relative_position_bias_table(v, self.window_size)
                    report.resized.append(k)
                if tuple(own[k].shape) != tuple(v.shape):
                    raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)} but this Swin (embed_dim "
                                     f"{self.embed_dim}, depths {list(self.depths)}, heads {list(self.num_heads)}) "
                                     f"expects {tuple(own[k].shape)} (wrong arch?)")
                usable[k] = v
            elif self._ignorable(k):
                report.ignored.append(k)
                if k.endswith("relative_position_index"):
                    self._check_index(k, v, source)
            else:
                report.unexpected.append(k)
        report.missing = sorted(k for k in own if k not in usable)
        hard = [k for k in report.missing if not re.match(r"norm\d+\.", k)]
        if hard:
            raise ValueError(f"{source}: missing {len(hard)} backbone tensors, e.g. {', '.join(hard[:5])}. "
                             f"Is this a Swin checkpoint of the same arch (official ImageNet 'model' dict, "
                             f"official Co-DETR 'backbone.layers.*' or mmdet 'backbone.stages.*')?")
        with torch.no_grad():
            for k, v in usable.items():
                own[k].copy_(v.to(own[k].dtype))
        report.loaded = len(usable)
        self.load_report = report
        if report.missing:
            logger.warning("Swin weights: %s (output norms not in checkpoint: %s)", report,
                           ", ".join(report.missing))
        else:
            logger.info("Swin weights: %s", report)
        return report

    def _check_index(self, key: str, stored: Tensor, source: str) -> None:
        """A checkpoint's stored relative position index must match ours when the window is the same."""
        m = re.match(r"(layers\.\d+\.blocks\.\d+\.attn)\.relative_position_index", key)
        if m is None:
            return
        try:
            mine = self.get_submodule(m.group(1)).relative_position_index
        except AttributeError:
            return  # unbuilt stage
        if stored.numel() == mine.numel() and not torch.equal(stored.reshape(-1).long(), mine.reshape(-1).long()):
            raise ValueError(f"{source}: {key} differs from the official relative position index layout; "
                             "this checkpoint's bias tables would be misinterpreted")


def _missing_weights_message(path: Path, arch: str, window: int) -> str:
    files = _WEIGHT_FILES[arch]
    pick = next((f for f in files if f"window{window}_" in f), files[0])
    others = ", ".join(f"{_RELEASE}/{f}" for f in files if f != pick)
    return (f"Swin weights file {path} does not exist. codetr never downloads weights. The official ImageNet "
            f"Swin-{arch[0].upper()} checkpoints are published by the Swin Transformer authors (the Co-DETR Swin-L "
            f"recipes use swin_large_patch4_window12_384_22k.pth with window_size 12). Download it on a machine "
            f"with internet access:\n"
            f"    curl -L -o {path} {_RELEASE}/{pick}\n"
            + (f"(also available: {others}; a checkpoint trained with another window size works too, its relative "
               f"position bias tables are resized)\n" if others else "")
            + "and set backbone.weights to that file (a full Co-DETR / mmdet detector checkpoint with 'backbone.*' "
              "keys works too), or set weights: null to start from random initialisation.")


def build_swin(cfg: SwinConfig) -> SwinTransformer:
    """Build the backbone of ``cfg`` and load its local weights, if any."""
    r = cfg.resolved()
    if cfg.weights is not None:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_weights_message(path, cfg.arch, r["window_size"]))
    model = SwinTransformer(embed_dim=r["embed_dim"], depths=r["depths"], num_heads=r["num_heads"],
                            window_size=r["window_size"], patch_size=cfg.patch_size, mlp_ratio=cfg.mlp_ratio,
                            drop_path_rate=r["drop_path_rate"], out_indices=cfg.out_indices,
                            frozen_stages=cfg.frozen_stages, with_cp=cfg.with_cp)
    if cfg.weights is not None:
        path = Path(cfg.weights).expanduser()
        model.load_pretrained(load_state_dict_file(path), source=str(path))
        model._freeze_stages()
    return model


COMPONENT = Component(
    config=SwinConfig,
    build=build_swin,
    summary="Swin Transformer T/S/B/L (official detection-Swin numerics and key names), returns stride 4..32 "
            "maps with output norms; local official / mmdet weights, window-size resizing",
)
