"""Unit tests of the Deformable-DETR variant: config / preset, init, padding invariance, extra query groups,
look-forward-twice gradients, one-stage mode, post-processing and the weight converters' key maps."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from codetr.convert.official import (convert_mmdet3_deformable, convert_sense_x_co_deformable,
                                     deformable_key_mmdet3, deformable_key_sense_x)
from codetr.core.interfaces import EXTRAS_ENC_LOGITS_ALL, EXTRAS_TOPK_INDICES, DecoderOutputs, QueryGroup
from codetr.core.registry import ComponentConfig
from codetr.variants.deformable import COMPONENT, PRESETS, DeformableDETR, DeformableDETRConfig, build
from codetr.variants.postprocess import postprocess

SMALL = dict(hidden_dim=64, num_queries=12, num_levels=3, num_classes=5, num_decoder_layers=2,
             num_encoder_layers=2, num_heads=4, num_points=2, ffn_dim=96)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Make zero / constant initialised tensors (last box layer, MSDA offsets ...) non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _model(seed: int = 0, **kw) -> DeformableDETR:
    torch.manual_seed(seed)
    m = build(DeformableDETRConfig(**{**SMALL, **kw}))
    _perturb(m, seed)
    return m.eval()


def _levels(shapes, batch=1, seed=0, c=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=g) for h, w in shapes]


def _run(m: DeformableDETR, levels, masks):
    inputs = m.prepare(levels, masks, [8, 16, 32][:len(levels)])
    mem = m.encode(inputs)
    group = m.make_queries(mem, None)[0]
    return mem, group, m.decode(group, mem)


# --------------------------------------------------------------------------- config / preset
def test_preset_fills_fields_and_explicit_fields_win():
    cfg = DeformableDETRConfig(preset="deformable_detr_pp")
    for k, v in PRESETS["deformable_detr_pp"].items():
        assert getattr(cfg, k) == v
    cfg2 = DeformableDETRConfig(preset="deformable_detr_pp", ffn_dim=1024, look_forward_twice=False)
    assert cfg2.ffn_dim == 1024 and cfg2.look_forward_twice is False and cfg2.mixed_selection is True
    plain = DeformableDETRConfig()
    assert (plain.ffn_dim, plain.dropout, plain.two_stage, plain.with_box_refine) == (1024, 0.1, False, False)
    assert (plain.pe_offset, plain.pe_temperature, plain.num_heads, plain.num_points) == (-0.5, 10000, 8, 4)


def test_preset_num_queries_is_a_fallback_only():
    assert build(DeformableDETRConfig(preset="deformable_detr_pp", num_classes=3, num_decoder_layers=1,
                                      num_encoder_layers=1)).num_queries == 300
    injected = DeformableDETRConfig(preset="deformable_detr_pp", num_encoder_layers=1).model_copy(
        update=dict(num_queries=7, num_classes=3, num_decoder_layers=1))  # what the recipe loader does
    m = build(injected)
    assert m.num_queries == 7 and m.query_embedding.weight.shape == (7, 256)


def test_config_is_strict_and_validates_combinations():
    assert issubclass(COMPONENT.config, ComponentConfig) and COMPONENT.build is build
    with pytest.raises(ValidationError):
        DeformableDETRConfig(unknown=1)
    with pytest.raises(ValidationError):
        DeformableDETRConfig(preset="nope")
    with pytest.raises(ValidationError, match="two_stage"):
        DeformableDETRConfig(mixed_selection=True)
    with pytest.raises(ValidationError, match="with_box_refine"):
        DeformableDETRConfig(look_forward_twice=True)
    with pytest.raises(ValueError, match="num_classes"):
        build(DeformableDETRConfig())


# --------------------------------------------------------------------------- init
def test_official_init():
    torch.manual_seed(0)
    m = build(DeformableDETRConfig(**SMALL, preset="deformable_detr_pp"))
    bias = -math.log(0.99 / 0.01)
    assert len(m.class_heads) == SMALL["num_decoder_layers"] + 1  # per layer + encoder head
    for h in m.class_heads:
        assert torch.allclose(h.bias, torch.full_like(h.bias, bias))
    for h in m.box_heads:  # last layer zero, w/h bias reset to 0 for two-stage
        assert h.layers[-1].weight.abs().max() == 0 and h.layers[-1].bias.abs().max() == 0
    torch.manual_seed(0)
    refine = build(DeformableDETRConfig(**SMALL, with_box_refine=True))
    assert refine.box_heads[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert refine.box_heads[1].layers[-1].bias.tolist() == [0, 0, 0, 0]
    shared = build(DeformableDETRConfig(**SMALL))
    assert len(shared.class_heads) == 1 and shared.box_heads[0].layers[-1].bias.tolist() == [0, 0, -2, -2]
    assert shared.query_embedding.weight.shape == (12, 128) and shared.reference_points.bias.abs().max() == 0


def test_state_dict_layout():
    keys = set(_model(preset="deformable_detr_pp").state_dict())
    for k in ("level_embed", "encoder.layers.0.self_attn.sampling_offsets.weight", "encoder.layers.1.ffn.fc1.weight",
              "encoder.layers.0.norm2.bias", "decoder.layers.1.self_attn.in_proj_weight",
              "decoder.layers.0.cross_attn.value_proj.weight", "decoder.layers.0.norm3.weight",
              "class_heads.2.weight", "box_heads.2.layers.2.bias", "enc_output.weight", "enc_output_norm.weight",
              "pos_trans.weight", "pos_trans_norm.bias", "query_embedding.weight"):
        assert k in keys, k
    assert not any(k.startswith("reference_points") for k in keys)


# --------------------------------------------------------------------------- padding / batch invariance
@pytest.mark.parametrize("kw", [dict(preset="deformable_detr_pp"), dict(with_box_refine=True, two_stage=True),
                                dict(), dict(with_box_refine=True)], ids=["pp", "refine_twostage", "plain", "refine"])
def test_padded_batch_equals_single_images(kw):
    """Batch of two different-size images == each image alone (the engine's batch-size promise)."""
    m = _model(**kw)
    big = [(12, 15), (6, 8), (3, 4)]
    small = [(9, 10), (5, 5), (3, 3)]
    a = _levels(big, seed=1)
    b = _levels(small, seed=2)
    junk = _levels(big, seed=3)  # padding content must not matter
    batch_levels, batch_masks = [], []
    for la, lb, lj, (h, w) in zip(a, b, junk, small):
        lb_pad = lj.clone()
        lb_pad[..., :h, :w] = lb
        mb = torch.ones(1, *la.shape[-2:], dtype=torch.bool)
        mb[:, :h, :w] = False
        batch_levels.append(torch.cat([la, lb_pad]))
        batch_masks.append(torch.cat([torch.zeros_like(mb), mb]))
    no_mask = lambda lv: [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x in lv]  # noqa: E731
    with torch.no_grad():
        mem2, g2, out2 = _run(m, batch_levels, batch_masks)
        for i, (lv, shapes) in enumerate(((a, big), (b, small))):
            mem1, g1, out1 = _run(m, lv, no_mask(lv))
            for name in ("logits", "boxes", "hidden", "references"):
                got, want = getattr(out2, name)[:, i], getattr(out1, name)[:, 0]
                assert torch.allclose(got, want, atol=1e-5, rtol=0), (name, i, (got - want).abs().max())
            valid = ~mem2.inputs.padding_mask[i]
            assert torch.allclose(mem2.memory[i][valid], mem1.memory[0], atol=1e-5, rtol=0)
            if m.two_stage:
                got, want = mem2.extras[EXTRAS_ENC_LOGITS_ALL][i][valid], mem1.extras[EXTRAS_ENC_LOGITS_ALL][0]
                assert torch.allclose(got, want, atol=1e-5)
                assert torch.allclose(g2.reference[i], g1.reference[0], atol=1e-6)


def _favour_invalid_tokens(m: DeformableDETR) -> None:
    """Make the class-0 logit of an invalid (zeroed-memory) token the highest one: align the encoder class
    head's row 0 with LN(enc_output(0)), the constant feature every invalid token gets."""
    with torch.no_grad():
        u = m.enc_output_norm(m.enc_output.bias)
        m.class_head(m.num_decoder_layers).weight[0] = u / u.norm() * 4


def test_two_stage_topk_never_selects_padding():
    kw = dict(preset="deformable_detr_pp", num_queries=40)
    m = _model(**kw)
    official = _model(**kw, two_stage_mask_invalid=False)
    for x in (m, official):
        _favour_invalid_tokens(x)
    lv = _levels([(8, 8), (4, 4), (2, 2)], batch=1)
    masks = [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x in lv]
    for mk in masks:
        mk[:, :, mk.shape[-1] // 2:] = True
    with torch.no_grad():
        mem, group, _ = _run(m, lv, masks)
        mem_o, group_o, _ = _run(official, lv, masks)
    topk = mem.extras[EXTRAS_TOPK_INDICES][0]
    assert not mem.inputs.padding_mask[0, topk].any()
    assert torch.isfinite(group.reference).all()
    # the official ranking picks padded tokens here (their proposals are +inf -> reference 1.0)
    assert mem_o.inputs.padding_mask[0, mem_o.extras[EXTRAS_TOPK_INDICES][0]].any()
    assert (group_o.reference == 1).any()
    # only the ranking changes
    assert torch.equal(mem_o.extras[EXTRAS_ENC_LOGITS_ALL], mem.extras[EXTRAS_ENC_LOGITS_ALL])


def test_padded_batch_invariance_needs_invalid_masking():
    """With invalid-token logits on top, the batch/single equality holds only thanks to the top-k masking."""
    m = _model(preset="deformable_detr_pp")
    _favour_invalid_tokens(m)
    big, small = [(12, 15), (6, 8), (3, 4)], [(9, 10), (5, 5), (3, 3)]
    b = _levels(small, seed=2)
    padded, masks = [], []
    for lb, (h, w), (hh, ww) in zip(b, small, big):
        x = torch.zeros(1, 64, hh, ww)
        x[..., :h, :w] = lb
        mk = torch.ones(1, hh, ww, dtype=torch.bool)
        mk[:, :h, :w] = False
        padded.append(x)
        masks.append(mk)
    with torch.no_grad():
        _, _, out_pad = _run(m, padded, masks)
        _, _, out_one = _run(m, b, [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x in b])
    assert torch.allclose(out_pad.boxes, out_one.boxes, atol=1e-5, rtol=0)
    assert torch.allclose(out_pad.logits, out_one.logits, atol=1e-5, rtol=0)


def test_valid_ratios_and_level_start():
    m = _model()
    lv = _levels([(8, 10), (4, 5), (2, 3)], batch=2)
    masks = [torch.zeros(2, *x.shape[-2:], dtype=torch.bool) for x in lv]
    masks[0][1, 6:, :] = True
    masks[0][1, :, 5:] = True
    inputs = m.prepare(lv, masks, [8, 16, 32])
    assert inputs.feats.shape == (2, 80 + 20 + 6, 64) and inputs.pos.shape == inputs.feats.shape
    assert inputs.level_start.tolist() == [0, 80, 100] and inputs.spatial_shapes == [(8, 10), (4, 5), (2, 3)]
    assert inputs.valid_ratios[1, 0].tolist() == [0.5, 0.75] and inputs.valid_ratios[0].eq(1).all()
    assert inputs.padding_mask[1, :80].sum() == 80 - 30


# --------------------------------------------------------------------------- extra query groups
def test_decode_extra_query_group_with_same_weights():
    m = _model(preset="deformable_detr_pp")
    lv = _levels([(8, 10), (4, 5), (2, 3)], batch=2)
    masks = [torch.zeros(2, *x.shape[-2:], dtype=torch.bool) for x in lv]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        mem, main, out_main = _run(m, lv, masks)
        p = 7
        ref = torch.rand(2, p, 4, generator=g) * 0.5 + 0.25
        aux = QueryGroup(name="aux0", content=torch.randn(2, p, 64, generator=g),
                         reference=ref, pos=torch.randn(2, p, 64, generator=g))
        out_aux = m.decode(aux, mem)
        assert isinstance(out_aux, DecoderOutputs)
        assert out_aux.logits.shape == (2, 2, p, 5) and out_aux.boxes.shape == (2, 2, p, 4)
        assert out_aux.hidden.shape == (2, 2, p, 64) and out_aux.references.shape == (2, 2, p, 4)
        assert torch.equal(out_aux.references[0], ref)
        # decoding is stateless: the main group gives the same result after an aux pass
        again = m.decode(main, mem)
        assert torch.equal(again.logits, out_main.logits) and torch.equal(again.boxes, out_main.boxes)

        # a block-diagonal self-attention mask (True = blocked) == decoding the blocks separately
        q2 = QueryGroup(name="aux1", content=torch.randn(2, 5, 64, generator=g),
                        reference=torch.rand(2, 5, 4, generator=g) * 0.5 + 0.25, pos=torch.randn(2, 5, 64, generator=g))
        both = QueryGroup(name="both", content=torch.cat([aux.content, q2.content], 1),
                          reference=torch.cat([aux.reference, q2.reference], 1), pos=torch.cat([aux.pos, q2.pos], 1))
        mask = torch.ones(12, 12, dtype=torch.bool)
        mask[:7, :7] = False
        mask[7:, 7:] = False
        both.self_attn_mask = mask
        out_both = m.decode(both, mem)
        out_q2 = m.decode(q2, mem)
        assert torch.allclose(out_both.logits[:, :, :7], out_aux.logits, atol=1e-5)
        assert torch.allclose(out_both.boxes[:, :, 7:], out_q2.boxes, atol=1e-6)
        # per-(batch x head) mask form
        both.self_attn_mask = mask.expand(2 * m.num_heads, 12, 12)
        out_both3 = m.decode(both, mem)
        assert torch.allclose(out_both3.logits, out_both.logits, atol=1e-6)


def test_decode_requires_positional_queries():
    m = _model(preset="deformable_detr_pp")
    lv = _levels([(4, 4), (2, 2), (1, 1)])
    with torch.no_grad():
        mem, _, _ = _run(m, lv, [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x in lv])
    with pytest.raises(ValueError, match="positional"):
        m.decode(QueryGroup("aux0", torch.zeros(1, 3, 64), torch.full((1, 3, 4), 0.5)), mem)


# --------------------------------------------------------------------------- refinement semantics
@pytest.mark.parametrize("lft", [True, False])
def test_look_forward_twice_gradient_paths(lft):
    """lft: layer 1's box is built on layer 0's undetached refined box, so its loss reaches layer 0's box head;
    the reference *fed* to layer 1 is detached either way (layer 1's logits never reach box head 0)."""
    kw = dict(preset="deformable_detr_pp") if lft else dict(preset="deformable_detr_pp", look_forward_twice=False)
    m = _model(**kw).train()
    lv = _levels([(6, 6), (3, 3), (2, 2)])
    masks = [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x in lv]
    mem, group, out = _run(m, lv, masks)
    head0 = m.box_heads[0].layers[-1].weight
    (g_box,) = torch.autograd.grad(out.boxes[1].sum(), head0, retain_graph=True, allow_unused=True)
    assert (g_box is not None and g_box.abs().sum() > 0) == lft
    (g_cls,) = torch.autograd.grad(out.logits[1].sum(), head0, allow_unused=True)
    assert g_cls is None or g_cls.abs().sum() == 0
    # values do not depend on lft: layer l's box == the reference layer l+1 refines from
    assert torch.allclose(out.boxes[0], out.references[1])
    assert not out.references.requires_grad and not group.reference.requires_grad


def test_one_stage_two_dim_references():
    m = _model(with_box_refine=True)
    lv = _levels([(6, 6), (3, 3), (2, 2)])
    with torch.no_grad():
        mem, group, out = _run(m, lv, [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x in lv])
    assert group.reference.shape == (1, 12, 2) and not mem.extras
    assert out.references.shape == (2, 1, 12, 4)  # layer 0's 2-D reference padded with w = h = 0
    assert torch.equal(out.references[0, ..., :2], group.reference) and out.references[0, ..., 2:].eq(0).all()
    assert torch.allclose(out.references[1], out.boxes[0])
    plain = _model()
    with torch.no_grad():
        _, g, o = _run(plain, lv, [torch.zeros(1, *x.shape[-2:], dtype=torch.bool) for x in lv])
    assert o.references.shape == (2, 1, 12, 2)
    # no refinement: every layer predicts around the same fixed 2-D reference
    assert torch.equal(o.references[0], o.references[1])


# --------------------------------------------------------------------------- post-processing
def test_postprocess_topk_clamp_and_rescale():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 1] = 3.0   # best: query 2, class 1
    logits[0, 0, 0] = 1.0   # second: query 0, class 0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1], [0.95, 0.1, 0.3, 0.4]]])
    dets = postprocess((logits, boxes), torch.tensor([[100, 200]]), torch.tensor([[50, 400]]), topk=2)
    d = dets[0]
    assert d.labels.tolist() == [1, 0]
    assert torch.allclose(d.scores, torch.sigmoid(torch.tensor([3.0, 1.0])))
    # query 2 in the valid frame (h 100, w 200): x 160..200 (clamped from 220), y 0 (clamped from -10)..30
    assert torch.allclose(d.boxes[0], torch.tensor([160 * 2, 0.0, 200 * 2, 30 * 0.5]))
    assert torch.allclose(d.boxes[1], torch.tensor([80 * 2, 30 * 0.5, 120 * 2, 70 * 0.5]))
    out = DecoderOutputs(logits=logits[None].repeat(2, 1, 1, 1), boxes=boxes[None].repeat(2, 1, 1, 1),
                         hidden=torch.zeros(2, 1, 3, 4), references=torch.zeros(2, 1, 3, 4))
    assert torch.equal(postprocess(out, torch.tensor([[100, 200]]), torch.tensor([[50, 400]]), topk=2)[0].boxes,
                       d.boxes)


# --------------------------------------------------------------------------- converters (no fixtures needed)
def test_key_maps():
    sx = {
        "transformer.level_embeds": "level_embed",
        "transformer.encoder.layers.3.attentions.0.value_proj.weight": "encoder.layers.3.self_attn.value_proj.weight",
        "transformer.encoder.layers.0.ffns.0.layers.0.0.bias": "encoder.layers.0.ffn.fc1.bias",
        "transformer.encoder.layers.0.ffns.0.layers.1.weight": "encoder.layers.0.ffn.fc2.weight",
        "transformer.encoder.layers.0.norms.1.weight": "encoder.layers.0.norm2.weight",
        "transformer.decoder.layers.1.attentions.0.attn.in_proj_weight": "decoder.layers.1.self_attn.in_proj_weight",
        "transformer.decoder.layers.1.attentions.0.attn.out_proj.bias": "decoder.layers.1.self_attn.out_proj.bias",
        "transformer.decoder.layers.1.attentions.1.sampling_offsets.bias": "decoder.layers.1.cross_attn.sampling_offsets.bias",
        "transformer.decoder.layers.0.norms.2.bias": "decoder.layers.0.norm3.bias",
        "transformer.enc_output_norm.weight": "enc_output_norm.weight",
        "transformer.pos_trans.weight": "pos_trans.weight",
        "transformer.reference_points.weight": "reference_points.weight",
        "cls_branches.6.bias": "class_heads.6.bias",
        "reg_branches.2.4.weight": "box_heads.2.layers.2.weight",
        "reg_branches.0.2.bias": "box_heads.0.layers.1.bias",
        "query_embedding.weight": "query_embedding.weight",
    }
    for src, dst in sx.items():
        assert deformable_key_sense_x(src) == dst, src
    assert deformable_key_sense_x("transformer.head_pos_embed.weight") is None
    m3 = {
        "level_embed": "level_embed",
        "encoder.layers.0.self_attn.attention_weights.weight": "encoder.layers.0.self_attn.attention_weights.weight",
        "encoder.layers.1.ffn.layers.0.0.weight": "encoder.layers.1.ffn.fc1.weight",
        "decoder.layers.0.self_attn.attn.in_proj_bias": "decoder.layers.0.self_attn.in_proj_bias",
        "decoder.layers.0.cross_attn.output_proj.weight": "decoder.layers.0.cross_attn.output_proj.weight",
        "decoder.layers.1.norms.0.weight": "decoder.layers.1.norm1.weight",
        "memory_trans_fc.weight": "enc_output.weight",
        "memory_trans_norm.bias": "enc_output_norm.bias",
        "pos_trans_fc.bias": "pos_trans.bias",
        "reference_points_fc.weight": "reference_points.weight",
        "bbox_head.cls_branches.1.weight": "class_heads.1.weight",
        "bbox_head.reg_branches.1.4.bias": "box_heads.1.layers.2.bias",
    }
    for src, dst in m3.items():
        assert deformable_key_mmdet3(src) == dst, src


def test_converters_roundtrip_on_synthetic_checkpoints():
    """Official-layout checkpoints built from our own model load back strictly, shared heads folded."""
    for mk in (lambda: _model(preset="deformable_detr_pp"), lambda: _model()):
        m = mk()
        ours = m.state_dict()
        # forge an official Sense-X checkpoint via the inverse of the key map
        fake = {}
        for k, v in ours.items():
            for src in _sense_x_candidates(k, m):
                fake["query_head." + src] = v
        fake["rpn_head.rpn_conv.weight"] = torch.zeros(1)
        fake["query_head.transformer.head_pos_embed.weight"] = torch.zeros(2, 1)
        target = ["variant." + k for k in ours]
        sd, report = convert_sense_x_co_deformable(fake, target_keys=target)
        assert report.missing == [] and set(report.unmatched) == {
            "rpn_head.rpn_conv.weight", "query_head.transformer.head_pos_embed.weight"}
        if m.share_heads:
            assert report.aliases  # per-layer copies of the shared head folded into index 0
        assert set(sd) == set(target)
    sd, report = convert_mmdet3_deformable({"level_embed": torch.zeros(3, 64), "foo.bar": torch.zeros(1)})
    assert list(sd) == ["variant.level_embed"] and list(report.unmatched) == ["foo.bar"]


def _sense_x_candidates(key: str, m: DeformableDETR) -> list[str]:
    import re

    if key.startswith(("class_heads.", "box_heads.")):
        kind, idx, rest = key.split(".", 2)
        idx = int(idx)
        n = m.num_decoder_layers + int(m.two_stage)
        idxs = range(n) if m.share_heads else [idx]
        if kind == "class_heads":
            return [f"cls_branches.{i}.{rest}" for i in idxs]
        lay = {"layers.0": "0", "layers.1": "2", "layers.2": "4"}[rest.rsplit(".", 1)[0]]
        return [f"reg_branches.{i}.{lay}.{rest.rsplit('.', 1)[1]}" for i in idxs]
    if key == "query_embedding.weight":
        return [key]
    if key == "level_embed":
        return ["transformer.level_embeds"]
    k = key
    k = re.sub(r"^encoder\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.attentions.0.", k)
    k = re.sub(r"^decoder\.layers\.(\d+)\.self_attn\.", r"decoder.layers.\1.attentions.0.attn.", k)
    k = re.sub(r"\.cross_attn\.", ".attentions.1.", k)
    k = k.replace("ffn.fc1.", "ffns.0.layers.0.0.").replace("ffn.fc2.", "ffns.0.layers.1.")
    k = k.replace("norm1.", "norms.0.").replace("norm2.", "norms.1.").replace("norm3.", "norms.2.")
    return ["transformer." + k]


def test_registry_validation_and_build():
    from codetr.core.registry import registry

    added = "deformable_detr" not in registry.names("variants")  # entry point not installed yet
    if added:
        registry.register("variants", "deformable_detr", COMPONENT)
    try:
        cfg = registry.validate("variants", {"type": "deformable_detr", "preset": "deformable_detr_pp",
                                             "num_encoder_layers": 1, "pe_offset": -0.5})
        assert isinstance(cfg, DeformableDETRConfig) and cfg.two_stage and cfg.ffn_dim == 2048
        cfg = cfg.model_copy(update=dict(hidden_dim=64, num_queries=5, num_levels=2, num_classes=3,
                                         num_decoder_layers=1))
        m = registry.build("variants", cfg)
        assert isinstance(m, DeformableDETR) and m.num_levels == 2 and len(m.encoder.layers) == 1
    finally:
        if added:
            registry.unregister("variants", "deformable_detr")
