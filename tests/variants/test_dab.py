"""Unit tests of the DAB-DETR variant: config / build checks, init (anchor_init) and state-dict layout, output
shapes, padding invariance, anchor refinement (detached between layers, shared box head), w/h modulation, the
query-group contract (extra groups, self-attention masks, errors), seeded determinism and one training step of a
tiny detector built from a recipe."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from codetr.assembly import build_detector, load_recipe_dict
from codetr.core.interfaces import QueryGroup
from codetr.core.registry import registry
from codetr.ops.functional import inverse_sigmoid
from codetr.variants.dab import COMPONENT, DABDETR, DABDETRConfig, build
from codetr.variants.conditional import ConditionalDETR
from tests.variants.test_conditional import TINY, _map, _perturb, tiny_batch

SMALL = dict(hidden_dim=32, num_queries=10, num_levels=1, num_classes=5, num_decoder_layers=3,
             num_encoder_layers=2, num_heads=4, ffn_dim=48)


def _model(seed: int = 0, **kw) -> DABDETR:
    torch.manual_seed(seed)
    m = build(DABDETRConfig(**{**SMALL, **kw}))
    _perturb(m, seed)
    return m.eval()


def _memory(m, x, mask=None):
    mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool) if mask is None else mask
    return m.encode(m.prepare([x], [mask], [32]))


# --------------------------------------------------------------------------- config / build / init
def test_config_defaults_and_registry():
    cfg = DABDETRConfig()
    assert (cfg.dropout, cfg.activation, cfg.pe_temperature) == (0.0, "prelu", 20.0)
    assert (cfg.ffn_dim, cfg.prior_prob) == (2048, 0.01)
    assert (cfg.keep_query_pos, cfg.modulate_hw_attn, cfg.anchor_init) == (False, True, "normal")
    with pytest.raises(ValidationError):
        DABDETRConfig(anchor_init="frozen_xy")
    assert COMPONENT.build is build and "dab_detr" in registry.names("variants")
    with pytest.raises(ValueError, match="num_levels must be 1"):
        build(DABDETRConfig(**{**SMALL, "num_levels": 4}))
    with pytest.raises(ValueError, match="num_classes"):
        build(DABDETRConfig(**{**SMALL, "num_classes": None}))


def test_state_dict_layout_and_init():
    torch.manual_seed(0)
    m = build(DABDETRConfig(**SMALL))
    keys = set(m.state_dict())
    assert {"anchor_embedding.weight", "encoder.query_scale.layers.1.weight", "decoder.ref_anchor_head.layers.1.bias",
            "decoder.ref_point_head.layers.0.weight", "encoder.layers.0.ffn.act.weight",
            "decoder.layers.2.ffn.act.weight", "decoder.layers.0.cross_attn.q_pos.weight"} <= keys
    assert "decoder.layers.1.cross_attn.q_pos.weight" not in keys and "query_embedding.weight" not in keys
    assert m.decoder.ref_point_head.layers[0].in_features == 64  # 4 x C/2 sine features
    assert m.anchor_embedding.weight.shape == (10, 4)
    assert torch.allclose(m.encoder.layers[0].ffn.act.weight, torch.tensor([0.25]))
    assert (m.box_heads[0].layers[-1].weight == 0).all() and len(m.box_heads) == 1
    keep = build(DABDETRConfig(**SMALL, keep_query_pos=True, modulate_hw_attn=False, activation="relu"))
    keep_keys = set(keep.state_dict())
    assert "decoder.layers.2.cross_attn.q_pos.weight" in keep_keys and keep.decoder.ref_anchor_head is None
    assert not any(".act." in k for k in keep_keys)


def test_anchor_init_uniform_xy():
    """uniform_xy: centres uniform(0, 1) in sigmoid space (the effective original random_refpoints_xy); they stay
    trainable (the original's freeze is a no-op and is not reproduced)."""
    torch.manual_seed(0)
    m = build(DABDETRConfig(**{**SMALL, "num_queries": 400}, anchor_init="uniform_xy"))
    xy = m.anchor_embedding.weight.detach()[:, :2].sigmoid()
    assert xy.min() >= 0 and xy.max() <= 1 and abs(float(xy.mean()) - 0.5) < 0.05 and float(xy.std()) > 0.25
    wh = m.anchor_embedding.weight.detach()[:, 2:]
    assert abs(float(wh.mean())) < 0.15 and 0.8 < float(wh.std()) < 1.2  # still N(0, 1)
    assert m.anchor_embedding.weight.requires_grad


def test_seeded_build_is_deterministic():
    a, b = _model(seed=5), _model(seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------- forward
def test_shapes_and_encoder_pos_scaling():
    m = _model()
    x = _map(batch=2)
    mem = _memory(m, x)
    assert mem.memory.shape == (2, 35, 32) and mem.extras == {}
    group = m.make_queries(mem, None)[0]
    assert group.pos is None and group.reference.shape == (2, 10, 4) and (group.content == 0).all()
    torch.testing.assert_close(group.reference[0], m.anchor_embedding.weight.sigmoid())
    out = m.decode(group, mem)
    assert out.logits.shape == (3, 2, 10, 5) and out.boxes.shape == (3, 2, 10, 4)
    assert out.references.shape == (3, 2, 10, 4)
    torch.testing.assert_close(out.references[0], group.reference)
    # refinement: layer l+1 refines the box layer l's update predicted (same shared head, un-normed state)
    assert (out.references[1] - out.references[0]).abs().max() > 1e-3
    # the encoder PE is scaled per layer by query_scale: zeroing its output changes the memory
    with torch.no_grad():
        m.encoder.query_scale.layers[-1].weight.zero_()
        m.encoder.query_scale.layers[-1].bias.zero_()
        assert (_memory(m, x).memory - mem.memory).abs().max() > 1e-3


def test_padding_does_not_change_valid_outputs():
    m = _model()
    x = _map(batch=2, hw=(6, 8), seed=1)
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    mask[1, 3:] = True
    mask[1, :, 6:] = True
    x[1][:, mask[1]] = -50.0
    with torch.no_grad():
        mem = _memory(m, x, mask)
        out = m.decode(m.make_queries(mem, None)[0], mem)
        alone_mem = _memory(m, x[1:, :, :3, :6].contiguous())
        alone = m.decode(m.make_queries(alone_mem, None)[0], alone_mem)
    torch.testing.assert_close(out.logits[:, 1], alone.logits[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.boxes[:, 1], alone.boxes[:, 0], atol=1e-5, rtol=0)


def test_anchor_update_is_detached_between_layers_but_not_for_predictions():
    m = _model().train()
    mem = _memory(m, _map())
    out = m.decode(m.make_queries(mem, None)[0], mem)
    head = list(m.box_heads[0].parameters())
    # layer 1's logits see the anchor only through the detached update: no gradient reaches the box head
    grads = torch.autograd.grad(out.logits[1].sum(), head, allow_unused=True, retain_graph=True)
    assert all(g is None or (g == 0).all() for g in grads)
    # layer 1's boxes build on the undetached update of layer 0 (original DAB-DETR): the box head gets gradient
    # from both, and so do the anchors (through layer 0's reference)
    assert out.references[1].requires_grad
    anchor_grad = torch.autograd.grad(out.boxes[1].sum(), m.anchor_embedding.weight, retain_graph=True)[0]
    assert anchor_grad.abs().sum() > 0
    # the prediction of layer l is box_head(norm(x_l)) + inverse_sigmoid(reference_l)
    with torch.no_grad():
        want = (m.box_heads[0](out.hidden[2]) + inverse_sigmoid(out.references[2])).sigmoid()
    torch.testing.assert_close(out.boxes[2].detach(), want, atol=1e-6, rtol=0)


def test_width_height_modulation():
    """With modulate_hw_attn the x half of the spatial query scales with w_ref / w and the y half with h_ref / h."""
    m = _model()
    c = m.hidden_dim
    sine = torch.rand(1, 3, 2 * c)
    x = torch.randn(1, 3, c)
    ref = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.5, 0.5], [0.7, 0.2, 0.1, 0.9]]])
    with torch.no_grad():
        s = m.spatial_query(sine, x, ref, layer=0)
        wh = m.decoder.ref_anchor_head(x).sigmoid()
    torch.testing.assert_close(s[..., c // 2:], sine[..., c // 2:c] * (wh[..., :1] / ref[..., 2:3]))
    torch.testing.assert_close(s[..., :c // 2], sine[..., :c // 2] * (wh[..., 1:] / ref[..., 3:]))
    plain = _model(modulate_hw_attn=False)
    torch.testing.assert_close(plain.spatial_query(sine, x, ref, layer=0), sine[..., :c])


# --------------------------------------------------------------------------- query-group contract
def test_decode_extra_group_and_self_attention_mask():
    m = _model()
    mem = _memory(m, _map(batch=2))
    g = torch.Generator().manual_seed(2)
    content = torch.randn(2, 6, 32, generator=g)
    ref = torch.rand(2, 6, 4, generator=g) * 0.8 + 0.1
    block = ~torch.eye(6, dtype=torch.bool)
    with torch.no_grad():
        out = m.decode(QueryGroup(name="aux0", content=content, reference=ref), mem)
        masked = m.decode(QueryGroup(name="aux0", content=content, reference=ref, self_attn_mask=block), mem)
        per_head = m.decode(QueryGroup(name="aux0", content=content, reference=ref,
                                       self_attn_mask=block.expand(8, 6, 6)), mem)
        alone = m.decode(QueryGroup(name="aux0", content=content[:, 2:3], reference=ref[:, 2:3]), mem)
    assert out.logits.shape == (3, 2, 6, 5)
    torch.testing.assert_close(masked.boxes[:, :, 2:3], alone.boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_head.boxes, masked.boxes, atol=1e-6, rtol=0)
    assert (out.logits - masked.logits).abs().max() > 1e-4


def test_wrong_groups_are_rejected():
    m = _model()
    mem = _memory(m, _map())
    main = m.make_queries(mem, None)[0]
    with pytest.raises(ValueError, match="pos must be None"):
        m.decode(QueryGroup(name="aux0", content=main.content, reference=main.reference, pos=main.content), mem)
    with pytest.raises(ValueError, match="4-D anchors"):
        m.decode(QueryGroup(name="aux0", content=main.content, reference=main.reference[..., :2]), mem)
    with pytest.raises(ValueError, match="content must be"):
        m.decode(QueryGroup(name="aux0", content=main.content[:, :, :4], reference=main.reference), mem)


# --------------------------------------------------------------------------- detector
def test_training_step_through_recipe():
    spec = {**TINY, "name": "tiny_dab",
            "model": {**TINY["model"], "variant": {"type": "dab_detr", "num_encoder_layers": 1, "num_heads": 4,
                                                   "ffn_dim": 48, "anchor_init": "uniform_xy"},
                      "criterion": {"enc_loss": "none", "cls_weight": 1.0}}}
    recipe = load_recipe_dict(spec, read_data=False)
    torch.manual_seed(0)
    model = build_detector(recipe.model).train()
    assert isinstance(model.variant, DABDETR) and not isinstance(model.variant, ConditionalDETR)
    losses = model.loss(tiny_batch())
    assert {"loss_cls", "loss_bbox", "loss_iou", "d0.loss_iou"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in model.variant.parameters() if p.requires_grad)
    model.eval()
    dets = model.predict(tiny_batch())
    assert len(dets) == 2 and len(dets[0]) == 10
