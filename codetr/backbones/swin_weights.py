"""Swin checkpoint layouts: official detection-Swin / ImageNet names and mmdet's ``stages.*`` names mapped to
:class:`~codetr.backbones.swin.SwinTransformer` keys, and relative position bias tables resized to another
window (bicubic, as mmdet and the official Swin do). Pure tensor functions, no module state.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

__all__ = ["official_swin_key_map", "swin_key_from_official", "resize_relative_position_bias_table"]


def resize_relative_position_bias_table(table: Tensor, window_size: int) -> Tensor:
    """((2w-1)^2, heads) table -> ((2W-1)^2, heads) for window W, bicubic (align_corners=False), as mmdet and the
    official Swin do when loading weights trained with another window."""
    length, heads = table.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"relative position bias table of {length} rows is not square")
    new_side = 2 * window_size - 1
    if side == new_side:
        return table
    grid = table.float().permute(1, 0).reshape(1, heads, side, side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new_side * new_side).permute(1, 0).contiguous().to(table.dtype)


def _unfold_to_official_reduction(w: Tensor) -> Tensor:
    """mmdet patch-merging reduction (out, C*4) in ``nn.Unfold`` order (c, kh*2+kw) -> official (out, 4*C) in
    ``x0 (0,0), x1 (1,0), x2 (0,1), x3 (1,1)`` order."""
    out, four_c = w.shape
    w = w.reshape(out, four_c // 4, 4).transpose(1, 2)  # (out, unfold position, C)
    return w[:, [0, 2, 1, 3], :].reshape(out, four_c)


def _unfold_to_official_norm(w: Tensor) -> Tensor:
    four_c = w.shape[0]
    return w.reshape(four_c // 4, 4).t()[[0, 2, 1, 3], :].reshape(four_c)


def _from_mmdet_key(key: str, value: Tensor) -> tuple[str, Tensor]:
    if key.startswith("patch_embed.projection."):
        return key.replace("patch_embed.projection.", "patch_embed.proj.", 1), value
    if not key.startswith("stages."):
        return key, value
    key = "layers." + key[len("stages."):]
    key = key.replace(".attn.w_msa.", ".attn.")
    key = key.replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(".ffn.layers.1.", ".mlp.fc2.")
    if ".downsample.reduction." in key:
        value = _unfold_to_official_reduction(value)
    elif ".downsample.norm." in key:
        value = _unfold_to_official_norm(value)
    return key, value


def swin_key_from_official(key: str, value: Tensor) -> tuple[str, Tensor]:
    """One Swin key (no ``backbone.`` prefix), official or mmdet layout -> :class:`SwinTransformer` key and
    tensor (patch-merging weights re-ordered from ``nn.Unfold`` order for the mmdet layout)."""
    return _from_mmdet_key(key, value)


def official_swin_key_map(state_dict: dict[str, Tensor], return_layout: bool = False):
    """Map a checkpoint's Swin keys to :class:`SwinTransformer` keys (official detection-Swin names).

    * A ``backbone.`` (``module.backbone.``, ``module.``) prefix is stripped and keys without it are dropped
      (full Co-DETR / mmdet detector checkpoints).
    * Official layout (ImageNet ``model`` dict, official Co-DETR ``SwinTransformerV1``): names kept; ``head.*``,
      the classification ``norm.*``, ``attn_mask`` and ``relative_position_index`` buffers are ignored at load.
    * mmdet layout (``stages.*``): ``stages -> layers``, ``attn.w_msa -> attn``, ``ffn.layers.0.0 -> mlp.fc1``,
      ``ffn.layers.1 -> mlp.fc2``, ``patch_embed.projection -> patch_embed.proj``; the patch-merging
      ``reduction`` / ``norm`` weights are permuted back from ``nn.Unfold`` channel order.

    Returns the mapped dict, or ``(mapped, layout)`` with layout "official" / "mmdet" when ``return_layout``.
    """
    keys = list(state_dict)
    sd = dict(state_dict)
    for prefix in ("module.backbone.", "backbone.", "module."):
        if any(k.startswith(prefix) for k in keys):
            sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    mmdet = any(k.startswith(("stages.", "patch_embed.projection.")) for k in sd)
    if mmdet:
        sd = dict(_from_mmdet_key(k, v) for k, v in sd.items())
    layout = "mmdet" if mmdet else "official"
    return (sd, layout) if return_layout else sd
