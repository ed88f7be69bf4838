"""Unit tests of the Conditional-DETR variant: config / build checks, init and state-dict layout, output shapes,
padding invariance, the query-group contract (extra groups with 2-D / 4-D references, self-attention masks,
errors), seeded determinism and one training step of a tiny detector built from a recipe."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from codetr.assembly import build_detector, load_recipe_dict
from codetr.core.interfaces import QueryGroup
from codetr.core.registry import registry
from codetr.core.structures import Batch, Target
from codetr.variants.conditional import COMPONENT, ConditionalDETR, ConditionalDETRConfig, build

SMALL = dict(hidden_dim=32, num_queries=10, num_levels=1, num_classes=5, num_decoder_layers=3,
             num_encoder_layers=2, num_heads=4, ffn_dim=48, dropout=0.0)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Make zero-initialised tensors (last box layer, attention output biases) non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _model(seed: int = 0, **kw) -> ConditionalDETR:
    torch.manual_seed(seed)
    m = build(ConditionalDETRConfig(**{**SMALL, **kw}))
    _perturb(m, seed)
    return m.eval()


def _map(batch=1, hw=(5, 7), seed=0, c=32):
    return torch.randn(batch, c, *hw, generator=torch.Generator().manual_seed(seed))


def _memory(m: ConditionalDETR, x, mask=None):
    mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool) if mask is None else mask
    return m.encode(m.prepare([x], [mask], [32]))


# --------------------------------------------------------------------------- config / build
def test_config_defaults_and_registry():
    cfg = ConditionalDETRConfig()
    assert (cfg.num_encoder_layers, cfg.num_heads, cfg.ffn_dim) == (6, 8, 2048)
    assert (cfg.dropout, cfg.activation) == (0.1, "relu")
    assert (cfg.pe_temperature, cfg.prior_prob) == (10000.0, 0.01)
    with pytest.raises(ValidationError):
        ConditionalDETRConfig(unknown=1)
    assert COMPONENT.build is build and "conditional_detr" in registry.names("variants")
    m = build(ConditionalDETRConfig(num_classes=3, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=16))
    assert (m.hidden_dim, m.num_levels, m.num_queries, m.min_tokens) == (256, 1, 300, 0)


def test_build_errors():
    with pytest.raises(ValueError, match="num_classes"):
        build(ConditionalDETRConfig(**{**SMALL, "num_classes": None}))
    with pytest.raises(ValueError, match="num_levels must be 1"):
        build(ConditionalDETRConfig(**{**SMALL, "num_levels": 4}))
    m = _model()
    with pytest.raises(ValueError, match="exactly one feature map"):
        m.prepare([_map(), _map()], [torch.zeros(1, 5, 7, dtype=torch.bool)] * 2, [16, 32])


def test_init_and_state_dict_layout():
    torch.manual_seed(0)
    m = build(ConditionalDETRConfig(**SMALL))
    keys = set(m.state_dict())
    assert "variant" not in "".join(keys) and "query_embedding.weight" in keys
    assert "decoder.layers.0.cross_attn.q_pos.weight" in keys
    assert not any(k.startswith(("decoder.layers.1.cross_attn.q_pos.", "decoder.layers.2.cross_attn.q_pos."))
                   for k in keys)
    assert {"class_heads.0.weight", "box_heads.0.layers.2.bias", "decoder.ref_point_head.layers.1.weight",
            "decoder.query_scale.layers.0.weight", "decoder.norm.weight",
            "encoder.layers.1.self_attn.in_proj_weight"} <= keys
    assert not any(k.startswith(("class_heads.1", "box_heads.1")) for k in keys)  # one shared head
    assert torch.allclose(m.class_heads[0].bias, torch.full((5,), -4.59512), atol=1e-4)
    assert (m.box_heads[0].layers[-1].weight == 0).all() and (m.box_heads[0].layers[-1].bias == 0).all()
    assert (m.decoder.layers[1].cross_attn.out_proj.bias == 0).all()


def test_seeded_build_is_deterministic():
    a, b = _model(seed=7), _model(seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


# --------------------------------------------------------------------------- forward
def test_shapes_and_fixed_references():
    m = _model()
    mem = _memory(m, _map(batch=2))
    assert mem.memory.shape == (2, 35, 32) and mem.inputs.spatial_shapes == [(5, 7)]
    assert mem.inputs.valid_ratios.shape == (2, 1, 2) and mem.extras == {}
    group = m.make_queries(mem, None)[0]
    assert group.name == "main" and group.reference.shape == (2, 10, 2) and group.pos.shape == (2, 10, 32)
    assert (group.content == 0).all()
    out = m.decode(group, mem)
    assert out.logits.shape == (3, 2, 10, 5) and out.boxes.shape == (3, 2, 10, 4) and out.hidden.shape == (3, 2, 10, 32)
    assert out.references.shape == (3, 2, 10, 2) and (out.references == group.reference).all()
    assert ((out.boxes > 0) & (out.boxes < 1)).all()


def test_padding_does_not_change_valid_outputs():
    """Image 1 padded (garbage in the padded cells) in a batch with a larger image 0 = image 1 alone."""
    m = _model()
    x = _map(batch=2, hw=(6, 8), seed=1)
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    mask[1, 4:] = True
    mask[1, :, 5:] = True
    x[1][:, mask[1]] = 100.0
    with torch.no_grad():
        mem = _memory(m, x, mask)
        out = m.decode(m.make_queries(mem, None)[0], mem)
        alone_mem = _memory(m, x[1:, :, :4, :5].contiguous())
        alone = m.decode(m.make_queries(alone_mem, None)[0], alone_mem)
    valid = ~mask[1].flatten()
    torch.testing.assert_close(mem.memory[1][valid], alone_mem.memory[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[:, 1], alone.logits[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.boxes[:, 1], alone.boxes[:, 0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- query-group contract
def test_decode_extra_groups_2d_and_4d_references():
    m = _model()
    mem = _memory(m, _map(batch=2))
    g = torch.Generator().manual_seed(3)
    content, pos = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    ref2 = torch.rand(2, 6, 2, generator=g)
    ref4 = torch.cat([ref2, torch.rand(2, 6, 2, generator=g)], -1)
    with torch.no_grad():
        out2 = m.decode(QueryGroup(name="aux0", content=content, reference=ref2, pos=pos), mem)
        out4 = m.decode(QueryGroup(name="aux0", content=content, reference=ref4, pos=pos), mem)
        main = m.make_queries(mem, None)[0]
        same = m.decode(QueryGroup(name="aux1", content=main.content.clone(), reference=main.reference.clone(),
                                   pos=main.pos.clone()), mem)
        ref_main = m.decode(main, mem)
    assert out2.logits.shape == (3, 2, 6, 5)
    torch.testing.assert_close(out2.logits, out4.logits, atol=0, rtol=0)  # only [..., :2] of 4-D references
    torch.testing.assert_close(out2.boxes, out4.boxes, atol=0, rtol=0)
    torch.testing.assert_close(same.boxes, ref_main.boxes, atol=0, rtol=0)  # decode uses the shared weights only


def test_self_attention_mask_is_honoured():
    """A mask that blocks all cross-query attention makes each query's output its output when decoded alone;
    (Q, Q) and (B * heads, Q, Q) masks agree; an unmasked group differs."""
    m = _model()
    mem = _memory(m, _map(batch=2))
    main = m.make_queries(mem, None)[0]
    q = main.content.shape[1]
    block = ~torch.eye(q, dtype=torch.bool)
    with torch.no_grad():
        masked = m.decode(QueryGroup(name="main", content=main.content, reference=main.reference, pos=main.pos,
                                     self_attn_mask=block), mem)
        per_head = m.decode(QueryGroup(name="main", content=main.content, reference=main.reference, pos=main.pos,
                                       self_attn_mask=block.expand(2 * 4, q, q)), mem)
        alone = m.decode(QueryGroup(name="one", content=main.content[:, 3:4], reference=main.reference[:, 3:4],
                                    pos=main.pos[:, 3:4]), mem)
        free = m.decode(main, mem)
    torch.testing.assert_close(masked.logits[:, :, 3:4], alone.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_head.logits, masked.logits, atol=1e-6, rtol=0)
    assert (free.logits - masked.logits).abs().max() > 1e-4


def test_wrong_groups_are_rejected():
    m = _model()
    mem = _memory(m, _map())
    main = m.make_queries(mem, None)[0]
    with pytest.raises(ValueError, match="needs QueryGroup.pos"):
        m.decode(QueryGroup(name="aux0", content=main.content, reference=main.reference), mem)
    with pytest.raises(ValueError, match="reference must be"):
        m.decode(QueryGroup(name="aux0", content=main.content, reference=main.reference[..., :1], pos=main.pos), mem)
    with pytest.raises(ValueError, match="content must be"):
        m.decode(QueryGroup(name="aux0", content=main.content[..., :8], reference=main.reference, pos=main.pos), mem)
    with pytest.raises(ValueError, match="pos must have"):
        m.decode(QueryGroup(name="aux0", content=main.content, reference=main.reference, pos=main.pos[:, :2]), mem)


# --------------------------------------------------------------------------- detector
TINY = {
    "name": "tiny_conditional",
    "model": {
        "num_classes": 4, "hidden_dim": 32, "num_levels": 1, "num_queries": 8, "num_decoder_layers": 2,
        "backbone": {"type": "resnet", "depth": 18, "out_indices": [4], "frozen_stages": -1, "norm": "gn"},
        "neck": {"type": "channel_mapper", "norm": "none", "num_extra_levels": 0},
        "variant": {"type": "conditional_detr", "num_encoder_layers": 1, "num_heads": 4, "ffn_dim": 48},
        "criterion": {"enc_loss": "none", "cls_weight": 2.0},
        "test": {"topk": 10},
    },
    "schedule": {"epochs": 1},
}


def tiny_batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, 64:] = True
    targets = [Target(boxes=torch.tensor([[10.0, 20.0, 60.0, 80.0]]), labels=torch.tensor([1]),
                      iscrowd=torch.zeros(1, dtype=torch.bool)),
               Target(boxes=torch.tensor([[5.0, 5.0, 40.0, 50.0], [50.0, 10.0, 120.0, 60.0]]),
                      labels=torch.tensor([0, 3]), iscrowd=torch.zeros(2, dtype=torch.bool))]
    return Batch(images=torch.randn(2, 3, 96, 128, generator=g), masks=masks, targets=targets,
                 image_sizes=torch.tensor([[96, 128], [64, 128]]), orig_sizes=torch.tensor([[96, 128], [64, 128]]),
                 image_ids=[0, 1])


def test_training_step_through_recipe():
    recipe = load_recipe_dict(TINY, read_data=False)
    torch.manual_seed(0)
    model = build_detector(recipe.model).train()
    assert model.neck.out_strides == [32] and type(model.variant).__name__ == "ConditionalDETR"
    losses = model.loss(tiny_batch())
    assert {"loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in model.variant.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="num_levels must be 1"):
        build_detector(load_recipe_dict({**TINY, "model": {**TINY["model"], "num_levels": 2,
                                                           "neck": {**TINY["model"]["neck"], "num_extra_levels": 1}}},
                                        read_data=False).model)


def test_dc5_recipe_override_gives_stride_16():
    from pathlib import Path

    from codetr.assembly import load_recipe

    path = Path(__file__).resolve().parents[2] / "recipes" / "conditional_detr_r50.yaml"
    recipe = load_recipe(path, ["model.backbone.weights=null", "model.backbone.dilation=true"], read_data=False)
    model = build_detector(recipe.model)
    assert model.backbone.strides == [16] and model.neck.out_strides == [16]
    assert recipe.model.criterion.cls_weight == 2.0 and recipe.model.test.topk == 100
