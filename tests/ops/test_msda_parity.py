"""End-to-end MSDA + sine-encoding parity: a minimal Deformable-DETR encoder (post-norm MSDA -> LN -> FFN -> LN)
built from :class:`MultiScaleDeformableAttention` and :class:`SinePositionalEncoding` reproduces the
official encoder memory from the stored neck outputs.

The encoder layer here is a test-only re-statement of the official layer order (the real encoder lives in the
variants package); it exists to pin the attention module's semantics (query_pos, identity residual, 2-D
reference points, level order) against real official numbers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codetr.ops.msda import MultiScaleDeformableAttention
from codetr.ops.position import SinePositionalEncoding
from tests._reference import load_int8exact_state_dict, load_safetensors_state_dict, reference_dir

MEMORY_ATOL = 1e-4


class _EncoderLayer(nn.Module):
    def __init__(self, ffn_dim: int, num_levels: int = 4):
        super().__init__()
        self.attn = MultiScaleDeformableAttention(256, 8, num_levels, 4)
        self.norm0 = nn.LayerNorm(256)
        self.fc1 = nn.Linear(256, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, 256)
        self.norm1 = nn.LayerNorm(256)

    def load(self, sd, attn: str, ffn: str, norms: str):
        own = {}
        for k in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            for t in ("weight", "bias"):
                own[f"attn.{k}.{t}"] = sd[f"{attn}.{k}.{t}"]
        for t in ("weight", "bias"):
            own[f"fc1.{t}"] = sd[f"{ffn}.layers.0.0.{t}"]
            own[f"fc2.{t}"] = sd[f"{ffn}.layers.1.{t}"]
            own[f"norm0.{t}"] = sd[f"{norms}.0.{t}"]
            own[f"norm1.{t}"] = sd[f"{norms}.1.{t}"]
        self.load_state_dict(own, strict=True)

    def forward(self, x, pos, ref, shapes):
        x = self.norm0(self.attn(x, None, ref, shapes, query_pos=pos))
        return self.norm1(x + self.fc2(torch.relu(self.fc1(x))))


def _encoder_inputs(neck_maps, level_embed):
    pe = SinePositionalEncoding(num_feats=128, temperature=10000, normalize=True, offset=-0.5)
    feats, pos, refs, shapes = [], [], [], []
    for lvl, m in enumerate(neck_maps):
        b, c, h, w = m.shape
        shapes.append((h, w))
        mask = torch.zeros(b, h, w, dtype=torch.bool)  # no padding in the fixtures
        feats.append(m.flatten(2).transpose(1, 2))
        pos.append(pe(mask).flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1))
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        refs.append(torch.stack((xs.reshape(-1) / w, ys.reshape(-1) / h), -1)[None])
    ref = torch.cat(refs, 1)[:, :, None].expand(-1, -1, len(shapes), -1)  # valid ratios are 1
    return torch.cat(feats, 1), torch.cat(pos, 1), ref, shapes


@pytest.mark.parity
def test_encoder_memory_deformable_detr_mmdet3():
    d = reference_dir("deformable_detr_refine_twostage_mmdet3_small")
    sd = load_int8exact_state_dict(d / "state_dict_int8exact_no_backbone.pt")
    neck = torch.load(d / "backbone_neck.pt")
    want = torch.load(d / "encoder.pt")["encoder_memory"]
    x, pos, ref, shapes = _encoder_inputs([neck[f"neck_out_{i}"] for i in range(4)], sd["level_embed"])
    layers = [_EncoderLayer(1024) for _ in range(2)]
    for i, layer in enumerate(layers):
        layer.load(sd, f"encoder.layers.{i}.self_attn", f"encoder.layers.{i}.ffn", f"encoder.layers.{i}.norms")
    with torch.no_grad():
        for layer in layers:
            x = layer(x, pos, ref, shapes)
    assert x.shape == want.shape
    assert (x - want).abs().max().item() <= MEMORY_ATOL


@pytest.mark.parity
def test_encoder_memory_co_deformable_detr_official():
    d = reference_dir("co_deformable_detr_official_small")
    sd = load_safetensors_state_dict(d / "state_dict.safetensors")
    feats = torch.load(d / "features.pt")
    t = "query_head.transformer"
    x, pos, ref, shapes = _encoder_inputs(feats["neck"], sd[f"{t}.level_embeds"])
    layers = [_EncoderLayer(2048) for _ in range(2)]
    for i, layer in enumerate(layers):
        p = f"{t}.encoder.layers.{i}"
        layer.load(sd, f"{p}.attentions.0", f"{p}.ffns.0", f"{p}.norms")
    with torch.no_grad():
        for layer in layers:
            x = layer(x, pos, ref, shapes)
    want = torch.cat([m.flatten(2).transpose(1, 2) for m in feats["aux_pyramid"][:4]], 1)
    assert (x - want).abs().max().item() <= MEMORY_ATOL
