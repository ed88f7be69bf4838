"""Forward parity with HuggingFace ``transformers`` Deformable-DETR (a test-only dependency).

A small HF ``DeformableDetrForObjectDetection`` (HF's own ResNet-18 backbone, no timm, d_model 128, 2 + 2 layers,
24 queries, 7 classes) is built from a config with every weight and BN statistic randomised (fixed seed; HF's
own init zeroes the offset / attention-weight projections and several biases, which would hide mapping errors),
converted with :func:`codetr.convert.hf.convert_hf_deformable_detr` into the codetr detector that
:func:`codetr.convert.hf.hf_recipe_model` describes (built through ``load_recipe_dict`` + ``build_detector``,
loaded with strict key checks), and both run on the same batch of two images with different padding.

Compared stage by stage (max abs diff <= 1e-4, boxes in normalised units): backbone C3..C5, neck levels, encoder
memory, two-stage proposals / proposal logits / proposal boxes (the +inf entries must coincide), the top-k
initial references, and per decoder layer the hidden states, class logits and boxes (plus the references each
layer refined from). Three HF configurations: refine + two-stage (the main case), refine only (HF 5.x ties
all class heads), and plain one-stage (shared heads).

HF semantics that codetr reproduces through recipe options (set by ``hf_recipe_model``), never by changing
defaults: ``two_stage_mask_invalid: false`` (HF ranks the two-stage top-k by the raw class-0 logit, invalid
proposals included, like the original repository), ``mixed_selection`` / ``look_forward_twice`` off,
``neck.conv_bias: true`` (HF's input projections have a conv bias in front of the GroupNorm) and
``test.exact_padding: false`` (HF runs the CNN on the zero-padded batch; codetr's inference default runs it per
image so that results do not depend on batch composition -- with it, the padded image 1 would differ). Matched without
options: HF's pixel mask is True on *valid* pixels (codetr: True on padding) and both resize it to each level
with nearest interpolation; the sine PE is normalised with offset -0.5 / eps 1e-6 over the valid extent; the
valid ratios, encoder reference points and proposal grid use the valid extent of each level.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from tests._reference import require_module

transformers = require_module("transformers", "a test-only dependency of the HF parity tests")

from codetr.convert.hf import convert_hf_deformable_detr, hf_key, hf_recipe_model  # noqa: E402
from codetr.assembly import build_detector  # noqa: E402
from codetr.assembly import load_recipe_dict  # noqa: E402
from codetr.core.interfaces import (EXTRAS_ENC_BOXES_UNACT_ALL, EXTRAS_ENC_LOGITS_ALL,  # noqa: E402
                                    EXTRAS_ENC_PROPOSALS_UNACT, EXTRAS_ENC_VALID, EXTRAS_TOPK_INDICES)
from tests.variants._hf import close as _close  # noqa: E402
from tests.variants._hf import padded_batch as _batch  # noqa: E402
from tests.variants._hf import randomize as _randomize  # noqa: E402

pytestmark = pytest.mark.parity

CASES = {
    "refine_two_stage": dict(with_box_refine=True, two_stage=True),
    "refine": dict(with_box_refine=True, two_stage=False),
    "plain": dict(with_box_refine=False, two_stage=False),
}


def _hf_config(**kw):
    from transformers import DeformableDetrConfig, ResNetConfig

    backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"], depths=[2, 2, 2, 2],
                            hidden_sizes=[64, 128, 256, 512], layer_type="basic")
    fields = dict(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
                  num_labels=7, d_model=128, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=256,
                  decoder_ffn_dim=256, num_queries=24, two_stage_num_proposals=24, dropout=0.0)
    return DeformableDetrConfig(**{**fields, **kw})


class _Capture:
    """Outputs of HF submodules / methods during one forward."""

    def __init__(self, hf) -> None:
        self.data: dict[str, object] = {}
        self.handles = []
        hook = self._hook
        self.handles.append(hf.model.backbone.model.register_forward_hook(hook("backbone")))
        for i, m in enumerate(hf.model.input_proj):
            self.handles.append(m.register_forward_hook(hook(f"proj{i}")))
        for i, m in enumerate(hf.class_embed):
            self.handles.append(m.register_forward_hook(hook(f"class{i}")))
        gen = hf.model.gen_encoder_output_proposals

        def record(*args):
            out = gen(*args)
            self.data["proposals"] = out[1]
            return out

        hf.model.gen_encoder_output_proposals = record

    def _hook(self, name):
        def fn(_module, _inputs, output):
            self.data.setdefault(name, output)  # first call only
        return fn


def _build(case: str):
    from transformers import DeformableDetrForObjectDetection

    cfg = _hf_config(**CASES[case])
    torch.manual_seed(0)
    hf = DeformableDetrForObjectDetection(cfg).eval()
    _randomize(hf, seed=3)
    recipe = load_recipe_dict({"name": f"hf_{case}", "model": hf_recipe_model(cfg), "schedule": {"epochs": 1}},
                              read_data=False)
    model = build_detector(recipe.model).eval()
    sd, report = convert_hf_deformable_detr(hf.state_dict(), target_keys=model.state_dict().keys())
    model.load_state_dict(sd, strict=True)
    return cfg, hf, model, report


@pytest.fixture(scope="module", params=list(CASES))
def run(request):
    case = request.param
    cfg, hf, model, report = _build(case)
    batch = _batch()
    cap = _Capture(hf)
    with torch.no_grad():
        out_hf = hf(pixel_values=batch.images, pixel_mask=(~batch.masks).long())
        feats = model.backbone(batch.images)
        levels = model.neck(feats)
        memory = model.encode(batch)
        group = model.variant.make_queries(memory, None)[0]
        out = model.variant.decode(group, memory)
    return dict(case=case, cfg=cfg, hf=hf, model=model, report=report, cap=cap.data, out_hf=out_hf, feats=feats,
                levels=levels, memory=memory, group=group, out=out)


def test_conversion_report(run):
    report = run["report"]
    assert report.missing == [] and report.unmatched == {}
    if run["case"] == "refine_two_stage":  # HF keeps tied copies of every head under model.decoder.*
        assert any(k.startswith("model.decoder.class_embed.") for k in report.aliases)
    if run["case"] == "plain":  # per-layer HF copies of one shared head
        assert "variant.class_heads.1.weight" in report.aliases
        assert not any(k.startswith("variant.class_heads.1.") for k in run["model"].state_dict())


def test_backbone_neck_encoder(run):
    cap, r = run["cap"], {}
    for i, (got, want) in enumerate(zip(run["feats"], cap["backbone"].feature_maps)):
        _close(f"C{i + 3}", got, want, r)
    for i, got in enumerate(run["levels"]):
        _close(f"level{i}", got, cap[f"proj{i}"], r)
    _close("memory", run["memory"].memory, run["out_hf"].encoder_last_hidden_state, r)
    # mask convention: HF resizes its valid-pixel mask per level, codetr its padding mask
    vr = run["memory"].inputs.valid_ratios
    assert (vr[0] == 1).all() and (vr[1] < 1).all()
    print(run["case"], "encoder parity (max abs diff):", r)


def test_two_stage_proposals(run):
    if run["case"] != "refine_two_stage":
        pytest.skip("one-stage configuration")
    ex, hf_out, r = run["memory"].extras, run["out_hf"], {}
    _close("enc_proposals_unact", ex[EXTRAS_ENC_PROPOSALS_UNACT], run["cap"]["proposals"], r)
    _close("enc_logits", ex[EXTRAS_ENC_LOGITS_ALL], hf_out.enc_outputs_class, r)
    _close("enc_boxes_unact", ex[EXTRAS_ENC_BOXES_UNACT_ALL], hf_out.enc_outputs_coord_logits, r)
    assert (~ex[EXTRAS_ENC_VALID][1]).sum() > (~ex[EXTRAS_ENC_VALID][0]).sum()  # padding makes invalid proposals
    # HF's selection: top-k of the raw class-0 logit (invalid proposals are not excluded)
    k = run["cfg"].two_stage_num_proposals
    hf_topk = torch.topk(hf_out.enc_outputs_class[..., 0], k, dim=1)[1]
    assert torch.equal(ex[EXTRAS_TOPK_INDICES][0], hf_topk[0])
    _close("init_reference", run["group"].reference, hf_out.init_reference_points, r)
    print("two-stage parity (max abs diff):", r)


def test_decoder_layers(run):
    out, hf_out, cap, r = run["out"], run["out_hf"], run["cap"], {}
    n = run["cfg"].decoder_layers
    _close("init_reference", out.references[0], _pad_like(hf_out.init_reference_points, out.references[0]), r)
    for layer in range(n):
        _close(f"hidden[{layer}]", out.hidden[layer], hf_out.intermediate_hidden_states[:, layer], r)
        _close(f"logits[{layer}]", out.logits[layer], cap[f"class{layer}"], r)
        if run["cfg"].with_box_refine:  # HF's refined references are the per-layer boxes
            _close(f"boxes[{layer}]", out.boxes[layer], hf_out.intermediate_reference_points[:, layer], r)
            if layer + 1 < n:
                _close(f"references[{layer + 1}]", out.references[layer + 1],
                       hf_out.intermediate_reference_points[:, layer], r)
    _close("logits[-1] (HF output)", out.logits[-1], hf_out.logits, r)
    _close("boxes[-1] (HF output)", out.boxes[-1], hf_out.pred_boxes, r)
    print(run["case"], "decoder parity (max abs diff):", r)


def _pad_like(ref: Tensor, like: Tensor) -> Tensor:
    """codetr stacks 2-D one-stage references with w = h = 0 when a refining model mixes 2-D and 4-D ones."""
    return ref if ref.shape[-1] == like.shape[-1] else torch.cat([ref, ref.new_zeros(ref.shape)], -1)


@torch.no_grad()
def test_two_stage_topk_can_select_invalid_proposals_like_hf():
    """HF (like the original code) ranks the proposals by the raw class-0 logit, so padding / out-of-range tokens
    (memory zeroed, proposal +inf) can be selected. The encoder class head is steered here so that they win:
    codetr reproduces HF only with ``two_stage_mask_invalid: false`` (what ``hf_recipe_model`` sets); its default
    (true) never selects them, which keeps a padded batch equal to the single images."""
    cfg, hf, model, _ = _build("refine_two_stage")
    x = hf.model.enc_output_norm(hf.model.enc_output.bias)  # what every invalid token becomes
    hf.class_embed[-1].weight[0] = 3.0 * x / x.norm()
    model.load_state_dict(convert_hf_deformable_detr(hf.state_dict(), target_keys=model.state_dict().keys())[0])
    batch = _batch()
    out_hf = hf(pixel_values=batch.images, pixel_mask=(~batch.masks).long())
    assert (out_hf.init_reference_points[1] == 1).all()  # image 1: every query is an invalid proposal
    memory = model.encode(batch)
    group = model.variant.make_queries(memory, None)[0]
    out = model.variant.decode(group, memory)
    r: dict[str, float] = {}
    _close("init_reference", group.reference, out_hf.init_reference_points, r)
    _close("logits[-1]", out.logits[-1], out_hf.logits, r)
    _close("boxes[-1]", out.boxes[-1], out_hf.pred_boxes, r)
    model.variant.cfg = model.variant.cfg.model_copy(update={"two_stage_mask_invalid": True})
    masked = model.variant.make_queries(model.encode(batch), None)[0]
    assert (masked.reference[1] < 1).all() and torch.allclose(masked.reference[0], group.reference[0])


def test_exact_padding_default_differs_from_hf_on_padded_images(run):
    """codetr's inference default (CNN per image) is exact for the unpadded image 0 and differs for image 1."""
    model, batch = run["model"], _batch()
    model.exact_padding = True
    try:
        with torch.no_grad():
            memory = model.encode(batch).memory
    finally:
        model.exact_padding = False
    hf_memory = run["out_hf"].encoder_last_hidden_state
    assert (memory[1] - hf_memory[1]).abs().max() > 1e-3
    r: dict[str, float] = {}
    _close("memory image 0 (exact_padding)", memory[0], hf_memory[0], r)


def test_predict_runs_on_converted_model(run):
    dets = run["model"].predict(_batch())
    assert len(dets) == 2 and all(len(d.scores) > 0 for d in dets)


# --------------------------------------------------------------------------- converter details
def test_key_map_examples():
    assert hf_key("model.backbone.model.embedder.embedder.convolution.weight") == "backbone.conv1.weight"
    assert hf_key("model.backbone.model.encoder.stages.2.layers.0.shortcut.normalization.running_var") == \
        "backbone.layer3.0.downsample.1.running_var"
    assert hf_key("model.backbone.model.encoder.stages.0.layers.1.layer.2.convolution.weight") == \
        "backbone.layer1.1.conv3.weight"
    assert hf_key("model.backbone.conv_encoder.model.layer2.0.bn1.weight") == "backbone.layer2.0.bn1.weight"
    assert hf_key("model.encoder.layers.3.final_layer_norm.bias") == "variant.encoder.layers.3.norm2.bias"
    assert hf_key("model.decoder.layers.1.encoder_attn_layer_norm.weight") == "variant.decoder.layers.1.norm2.weight"
    assert hf_key("model.decoder.layers.1.self_attn.o_proj.weight") == \
        "variant.decoder.layers.1.self_attn.out_proj.weight"
    assert hf_key("model.decoder.layers.0.fc1.weight") == "variant.decoder.layers.0.ffn.fc1.weight"  # 4.x
    assert hf_key("bbox_embed.6.layers.2.bias") == "variant.box_heads.6.layers.2.bias"
    assert hf_key("model.query_position_embeddings.weight") == "variant.query_embedding.weight"
    assert hf_key("model.something_new.weight") is None


def test_input_proj_bias_options():
    from transformers import DeformableDetrForObjectDetection

    cfg = _hf_config(with_box_refine=True, two_stage=True)
    torch.manual_seed(0)
    hf = DeformableDetrForObjectDetection(cfg)
    sd = hf.state_dict()
    # HF's init zeroes the biases: dropping them is exact and gives the default (bias-free) ChannelMapper layout
    out, report = convert_hf_deformable_detr(sd, input_proj_bias="drop")
    assert "neck.convs.0.conv.bias" not in out and "model.input_proj.0.0.bias" in report.ignored
    assert "neck.extra_convs.0.conv.weight" in out and out["neck.extra_convs.0.conv.weight"].shape[-1] == 3
    out, _ = convert_hf_deformable_detr(sd)  # auto, all zero, no target keys -> dropped
    assert "neck.convs.0.conv.bias" not in out
    sd = dict(sd)
    sd["model.input_proj.1.0.bias"] = torch.full_like(sd["model.input_proj.1.0.bias"], 0.5)
    with pytest.raises(ValueError, match="conv_bias: true"):
        convert_hf_deformable_detr(sd, input_proj_bias="drop")
    out, _ = convert_hf_deformable_detr(sd)  # auto keeps non-zero biases
    assert torch.equal(out["neck.convs.1.conv.bias"], sd["model.input_proj.1.0.bias"])


def test_tied_heads_stored_once_are_completed():
    """A state dict saved without HF's tied duplicates (only head 0 of a tied group, no model.decoder.* copies)."""
    from transformers import DeformableDetrForObjectDetection

    cfg = _hf_config(with_box_refine=True, two_stage=False)
    torch.manual_seed(0)
    hf = DeformableDetrForObjectDetection(cfg).eval()
    sd = {k: v for k, v in hf.state_dict().items()
          if not k.startswith("model.decoder.bbox_embed.") and not re.match(r"^class_embed\.[1-9]", k)}
    recipe = load_recipe_dict({"name": "hf", "model": hf_recipe_model(cfg), "schedule": {"epochs": 1}},
                              read_data=False)
    model = build_detector(recipe.model)
    out, report = convert_hf_deformable_detr(sd, target_keys=model.state_dict().keys())
    assert report.missing == [] and report.aliases["variant.class_heads.1.weight"] == "variant.class_heads.0.weight"
    model.load_state_dict(out, strict=True)


def test_recipe_rejects_what_codetr_cannot_build():
    from transformers import ResNetConfig

    with pytest.raises(ValueError, match="FFN"):
        hf_recipe_model(_hf_config(decoder_ffn_dim=512))
    with pytest.raises(ValueError, match="activation"):
        hf_recipe_model(_hf_config(activation_function="gelu"))
    cfg = _hf_config()
    cfg.backbone_config = ResNetConfig(out_features=["stage2", "stage3", "stage4"], downsample_in_bottleneck=True)
    with pytest.raises(ValueError, match="downsample_in_bottleneck"):
        hf_recipe_model(cfg)
    r50 = _hf_config()
    r50.backbone_config = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    model = hf_recipe_model(r50)
    assert model["backbone"]["depth"] == 50 and model["neck"]["conv_bias"] is True
