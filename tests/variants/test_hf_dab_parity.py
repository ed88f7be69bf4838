"""Forward and loss parity with HuggingFace ``transformers`` DAB-DETR (a test-only dependency).

A small HF ``DabDetrForObjectDetection`` (HF's own ResNet-18 backbone, no timm, ``out_features ["stage4"]``,
hidden size 64, 2 + 2 layers, 20 queries, 7 classes, ``auxiliary_loss=True``) has every parameter, PReLU slope
and BN statistic randomised, is converted strictly with :func:`codetr.convert.hf_single_scale.convert_hf_dab_detr`
into the detector :func:`~codetr.convert.hf_single_scale.hf_dab_recipe_model` describes, and both run on one
zero-padded batch of two images of different sizes. Compared (max abs diff <= 1e-4): C5, the projected level,
the encoder memory (DAB's per-layer ``query_scale`` of the PE), the anchors each layer refines from, every
layer's normed hidden state, logits and boxes, HF's final outputs and the one-to-one losses of **every** decoder
layer (HF's loss with the same targets; focal weight 1, L1 5, GIoU 2). Two configurations: the default one and
``keep_query_pos`` with ReLU.
"""

from __future__ import annotations

import pytest
import torch

from tests._reference import require_module

transformers = require_module("transformers", "a test-only dependency of the HF parity tests")

from codetr.assembly import build_detector  # noqa: E402
from codetr.assembly import load_recipe_dict  # noqa: E402
from codetr.convert.hf_single_scale import convert_hf_dab_detr, hf_dab_recipe_model, hf_single_scale_key  # noqa: E402
from tests.variants._hf import TARGETS, close, hf_labels, padded_batch, randomize  # noqa: E402

pytestmark = pytest.mark.parity

CASES = {"default": {}, "keep_query_pos_relu": dict(keep_query_pos=True, activation_function="relu")}


def hf_config(**kw):
    from transformers import DabDetrConfig, ResNetConfig

    backbone = ResNetConfig(out_features=["stage4"], depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                            layer_type="basic")
    fields = dict(backbone_config=backbone, num_labels=7, hidden_size=64, encoder_layers=2, decoder_layers=2,
                  encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
                  num_queries=20, dropout=0.0, auxiliary_loss=True)
    return DabDetrConfig(**{**fields, **kw})


@pytest.fixture(scope="module", params=list(CASES))
def run(request):
    from transformers import DabDetrForObjectDetection

    cfg = hf_config(**CASES[request.param])
    torch.manual_seed(0)
    hf = DabDetrForObjectDetection(cfg).eval()
    randomize(hf, seed=3)
    recipe = load_recipe_dict({"name": "hf_dab", "model": hf_dab_recipe_model(cfg), "schedule": {"epochs": 1}},
                              read_data=False)
    model = build_detector(recipe.model).eval()
    sd, report = convert_hf_dab_detr(hf.state_dict(), target_keys=model.state_dict().keys())
    model.load_state_dict(sd, strict=True)

    cap: dict[str, object] = {}
    hooks = [hf.model.backbone.conv_encoder.model.register_forward_hook(lambda m, i, o: cap.setdefault("backbone", o)),
             hf.model.input_projection.register_forward_hook(lambda m, i, o: cap.setdefault("proj", o)),
             hf.model.decoder.register_forward_hook(lambda m, i, o: cap.setdefault("decoder", o))]
    batch = padded_batch(TARGETS)
    with torch.no_grad():
        out_hf = hf(pixel_values=batch.images, pixel_mask=(~batch.masks).long(), labels=hf_labels(batch),
                    output_hidden_states=True)
        feats = model.backbone(batch.images)
        levels = model.neck(feats)
        memory = model.encode(batch)
        group = model.variant.make_queries(memory, None)[0]
        out = model.variant.decode(group, memory)
        losses = model.criterion(out, batch, memory.extras)
    for h in hooks:
        h.remove()
    return dict(case=request.param, cfg=cfg, hf=hf, model=model, report=report, cap=cap, out_hf=out_hf, feats=feats,
                levels=levels, memory=memory, group=group, out=out, losses=losses)


def test_conversion_report(run):
    report = run["report"]
    assert report.missing == [] and report.unmatched == {}
    # HF's anchor-update head is a tied copy of the prediction head: one codetr head
    heads = {k for k in run["model"].state_dict() if k.startswith("variant.box_heads.0.")}
    assert report.aliases and set(report.aliases.values()) <= heads
    keys = run["model"].state_dict()
    assert ("variant.decoder.layers.1.cross_attn.q_pos.weight" in keys) == run["cfg"].keep_query_pos
    assert ("variant.encoder.layers.0.ffn.act.weight" in keys) == (run["cfg"].activation_function == "prelu")


def test_backbone_neck_encoder(run):
    cap, r = run["cap"], {}
    close("C5", run["feats"][0], cap["backbone"].feature_maps[-1], r)
    close("level0", run["levels"][0], cap["proj"], r)
    close("memory", run["memory"].memory, run["out_hf"].encoder_last_hidden_state, r)
    print(run["case"], "DAB encoder parity (max abs diff):", r)


def test_decoder_layers(run):
    dec, out, out_hf, r = run["cap"]["decoder"], run["out"], run["out_hf"], {}
    close("init_reference", run["group"].reference, dec.reference_points[0], r)
    for k in range(run["cfg"].decoder_layers):
        close(f"references[{k}]", out.references[k], dec.reference_points[k], r)
        close(f"hidden[{k}]", out.hidden[k], dec.intermediate_hidden_states[k], r)
        if k + 1 < run["cfg"].decoder_layers:
            close(f"logits[{k}]", out.logits[k], out_hf.auxiliary_outputs[k]["logits"], r)
            close(f"boxes[{k}]", out.boxes[k], out_hf.auxiliary_outputs[k]["pred_boxes"], r)
    close("logits[-1] (HF output)", out.logits[-1], out_hf.logits, r)
    close("boxes[-1] (HF output)", out.boxes[-1], out_hf.pred_boxes, r)
    print(run["case"], "DAB decoder parity (max abs diff):", r)


def test_one_to_one_losses_every_layer(run):
    """HF's per-layer loss terms (``loss_ce[_i]`` ..., unweighted; weights 1 / 5 / 2) equal codetr's criterion."""
    hf_losses, cfg, ours, r = run["out_hf"].loss_dict, run["cfg"], run["losses"], {}
    n = cfg.decoder_layers
    total = 0.0
    for k in range(n):
        hf_suffix, ours_prefix = ("", "") if k == n - 1 else (f"_{k}", f"d{k}.")
        close(f"{ours_prefix}loss_cls", ours[f"{ours_prefix}loss_cls"], hf_losses[f"loss_ce{hf_suffix}"], r)
        close(f"{ours_prefix}loss_bbox", ours[f"{ours_prefix}loss_bbox"],
              hf_losses[f"loss_bbox{hf_suffix}"] * cfg.bbox_loss_coefficient, r)
        close(f"{ours_prefix}loss_iou", ours[f"{ours_prefix}loss_iou"],
              hf_losses[f"loss_giou{hf_suffix}"] * cfg.giou_loss_coefficient, r)
        total = total + sum(ours[f"{ours_prefix}loss_{t}"] for t in ("cls", "bbox", "iou"))
    close("loss (HF total)", total, run["out_hf"].loss, r)
    print(run["case"], "DAB loss parity (max abs diff):", r)


def test_predict_runs_on_converted_model(run):
    dets = run["model"].predict(padded_batch())
    assert len(dets) == 2 and all(len(d.scores) == 140 for d in dets)  # top-300 clamped to 20 queries x 7 classes


def test_key_map_examples():
    key = lambda k: hf_single_scale_key(k, "dab_detr")  # noqa: E731
    assert key("model.backbone.conv_encoder.model.embedder.embedder.convolution.weight") == "backbone.conv1.weight"
    assert key("model.query_refpoint_embeddings.weight") == "variant.anchor_embedding.weight"
    assert key("model.encoder.query_scale.layers.1.bias") == "variant.encoder.query_scale.layers.1.bias"
    assert key("model.encoder.layers.0.activation_fn.weight") == "variant.encoder.layers.0.ffn.act.weight"
    assert key("model.encoder.layers.0.self_attn.out_proj.bias") == "variant.encoder.layers.0.self_attn.out_proj.bias"
    assert key("model.decoder.layers.1.self_attn.self_attn_key_pos_proj.weight") == \
        "variant.decoder.layers.1.self_attn.k_pos.weight"
    assert key("model.decoder.layers.1.cross_attn.cross_attn_query_pos_sine_proj.bias") == \
        "variant.decoder.layers.1.cross_attn.q_pos_sine.bias"
    assert key("model.decoder.layers.0.cross_attn.cross_attn.output_proj.weight") == \
        "variant.decoder.layers.0.cross_attn.out_proj.weight"
    assert key("model.decoder.layers.0.mlp.final_layer_norm.bias") == "variant.decoder.layers.0.norm3.bias"
    assert key("model.decoder.ref_anchor_head.layers.0.weight") == "variant.decoder.ref_anchor_head.layers.0.weight"
    assert key("model.decoder.bbox_embed.layers.2.bias") == key("bbox_predictor.layers.2.bias") == \
        "variant.box_heads.0.layers.2.bias"
    assert key("class_embed.weight") == "variant.class_heads.0.weight"
    assert key("model.patterns.weight") is None


def test_untied_anchor_update_head_is_rejected():
    from transformers import DabDetrForObjectDetection

    sd = dict(DabDetrForObjectDetection(hf_config()).state_dict())
    sd["model.decoder.bbox_embed.layers.0.bias"] = sd["model.decoder.bbox_embed.layers.0.bias"] + 1.0
    with pytest.raises(ValueError, match="tied copy"):
        convert_hf_dab_detr(sd)


def test_recipe_options_and_rejections():
    model = hf_dab_recipe_model(hf_config(random_refpoints_xy=True))
    v = model["variant"]
    assert (v["anchor_init"], v["pe_temperature"], v["activation"], v["dropout"]) == ("uniform_xy", 20.0, "prelu", 0.0)
    assert v["prior_prob"] == pytest.approx(1 / 8) and model["criterion"]["cls_weight"] == 1.0
    assert model["test"]["topk"] == 300
    with pytest.raises(ValueError, match="num_patterns"):
        hf_dab_recipe_model(hf_config(num_patterns=3))
    with pytest.raises(ValueError, match="normalize_before"):
        hf_dab_recipe_model(hf_config(normalize_before=True))
    with pytest.raises(ValueError, match="temperature"):
        hf_dab_recipe_model(hf_config(temperature_height=10))
