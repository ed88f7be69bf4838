"""Forward and loss parity with HuggingFace ``transformers`` Conditional-DETR (a test-only dependency).

A small HF ``ConditionalDetrForObjectDetection`` (HF's own ResNet-18 backbone, no timm, ``out_features
["stage4"]``, d_model 64, 2 + 2 layers, 20 queries, 7 classes) has every parameter and BN statistic randomised
(HF's init zeroes several tensors), is converted strictly with
:func:`codetr.convert.hf_single_scale.convert_hf_conditional_detr` into the detector that
:func:`~codetr.convert.hf_single_scale.hf_conditional_recipe_model` describes, and both run on one zero-padded
batch of two images of different sizes. Compared (max abs diff <= 1e-4): C5, the projected level, the encoder
memory, the reference points, every decoder layer's logits and boxes (HF's hidden state of each layer through its
own output LayerNorm and heads), HF's final outputs, and the one-to-one losses (HF's loss with the same targets:
focal weight 1, L1 5, GIoU 2; codetr's criterion configured by the recipe builder).

Two HF configurations: ``auxiliary_loss=False`` -- the original Conditional-DETR function; HF then returns the last
layer only, so the per-layer outputs are compared through HF's decoder-layer outputs and its own norm / heads --
and ``auxiliary_loss=True``, where HF's decoder feeds the normed output to the next layer (not the original;
codetr's ``variant.norm_feedback: true``, set by the recipe builder): HF's auxiliary outputs and every layer's
losses are compared directly (see docs/deviations.md).
"""

from __future__ import annotations

import pytest
import torch

from tests._reference import require_module

transformers = require_module("transformers", "a test-only dependency of the HF parity tests")

from codetr.assembly import build_detector  # noqa: E402
from codetr.assembly import load_recipe_dict  # noqa: E402
from codetr.convert.hf_single_scale import (convert_hf_conditional_detr, hf_conditional_recipe_model,  # noqa: E402
                                            hf_single_scale_key)
from codetr.ops.functional import inverse_sigmoid  # noqa: E402
from tests.variants._hf import TARGETS, close, hf_labels, padded_batch, randomize  # noqa: E402

pytestmark = pytest.mark.parity

def hf_config(**kw):
    from transformers import ConditionalDetrConfig, ResNetConfig

    backbone = ResNetConfig(out_features=["stage4"], depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                            layer_type="basic")
    fields = dict(backbone_config=backbone, num_labels=7, d_model=64, encoder_layers=2, decoder_layers=2,
                  encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
                  num_queries=20, dropout=0.0, auxiliary_loss=False)
    return ConditionalDetrConfig(**{**fields, **kw})


CASES = {"original": dict(auxiliary_loss=False), "hf_aux_loss": dict(auxiliary_loss=True)}


@pytest.fixture(scope="module", params=list(CASES))
def run(request):
    from transformers import ConditionalDetrForObjectDetection

    cfg = hf_config(**CASES[request.param])
    torch.manual_seed(0)
    hf = ConditionalDetrForObjectDetection(cfg).eval()
    randomize(hf, seed=3)
    recipe = load_recipe_dict({"name": "hf_conditional", "model": hf_conditional_recipe_model(cfg),
                               "schedule": {"epochs": 1}}, read_data=False)
    model = build_detector(recipe.model).eval()
    sd, report = convert_hf_conditional_detr(hf.state_dict(), target_keys=model.state_dict().keys())
    model.load_state_dict(sd, strict=True)

    cap: dict[str, object] = {}
    hooks = [hf.model.backbone.model.register_forward_hook(lambda m, i, o: cap.setdefault("backbone", o)),
             hf.model.input_projection.register_forward_hook(lambda m, i, o: cap.setdefault("proj", o)),
             hf.model.decoder.register_forward_hook(lambda m, i, o: cap.setdefault("decoder", o))]
    for k, layer in enumerate(hf.model.decoder.layers):
        hooks.append(layer.register_forward_hook(lambda m, i, o, k=k: cap.setdefault(f"layer{k}", o)))
    batch = padded_batch(TARGETS)
    with torch.no_grad():
        out_hf = hf(pixel_values=batch.images, pixel_mask=(~batch.masks).long(), labels=hf_labels(batch))
        feats = model.backbone(batch.images)
        levels = model.neck(feats)
        memory = model.encode(batch)
        group = model.variant.make_queries(memory, None)[0]
        out = model.variant.decode(group, memory)
        losses = model.criterion(out, batch, memory.extras)
    for h in hooks:
        h.remove()
    return dict(case=request.param, cfg=cfg, hf=hf, model=model, report=report, cap=cap, out_hf=out_hf, feats=feats,
                levels=levels, memory=memory, group=group, out=out, losses=losses, batch=batch)


def test_conversion_report(run):
    report = run["report"]
    assert report.missing == [] and report.unmatched == {} and report.aliases == {}
    assert run["model"].variant.cfg.norm_feedback == run["cfg"].auxiliary_loss
    # only layer 0 has the cross-attention positional-query projection, in both layouts
    keys = run["model"].state_dict()
    assert "variant.decoder.layers.0.cross_attn.q_pos.weight" in keys
    assert "variant.decoder.layers.1.cross_attn.q_pos.weight" not in keys


def test_backbone_neck_encoder(run):
    cap, r = run["cap"], {}
    close("C5", run["feats"][0], cap["backbone"].feature_maps[-1], r)
    close("level0", run["levels"][0], cap["proj"], r)
    close("memory", run["memory"].memory, run["out_hf"].encoder_last_hidden_state, r)
    print(run["case"], "conditional encoder parity (max abs diff):", r)


def test_decoder_layers(run):
    hf, cap, out, r = run["hf"], run["cap"], run["out"], {}
    ref = cap["decoder"].reference_points.transpose(0, 1)  # HF stores it (Q, B, 2)
    close("reference", run["group"].reference, ref, r)
    n = run["cfg"].decoder_layers
    if run["cfg"].auxiliary_loss:  # HF returns every layer (normed state fed forward, last one normed twice)
        for k in range(n - 1):
            close(f"logits[{k}]", out.logits[k], run["out_hf"].auxiliary_outputs[k]["logits"], r)
            close(f"boxes[{k}]", out.boxes[k], run["out_hf"].auxiliary_outputs[k]["pred_boxes"], r)
    with torch.no_grad():
        for k in range(0 if run["cfg"].auxiliary_loss else n):
            h = hf.model.decoder.layernorm(cap[f"layer{k}"])
            delta = hf.bbox_predictor(h)
            boxes = torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], -1).sigmoid()
            close(f"hidden[{k}]", out.hidden[k], h, r)
            close(f"logits[{k}]", out.logits[k], hf.class_labels_classifier(h), r)
            close(f"boxes[{k}]", out.boxes[k], boxes, r)
            close(f"references[{k}]", out.references[k], ref, r)
    close("logits[-1] (HF output)", out.logits[-1], run["out_hf"].logits, r)
    close("boxes[-1] (HF output)", out.boxes[-1], run["out_hf"].pred_boxes, r)
    print(run["case"], "conditional decoder parity (max abs diff):", r)


def test_norm_feedback_is_a_different_function(run):
    """HF's ``auxiliary_loss=True`` decoder is not the original's: codetr without ``norm_feedback`` differs from it."""
    if not run["cfg"].auxiliary_loss:
        pytest.skip("HF auxiliary_loss=False is the original function")
    variant = run["model"].variant
    variant.cfg = variant.cfg.model_copy(update={"norm_feedback": False})
    try:
        with torch.no_grad():
            out = variant.decode(run["group"], run["memory"])
    finally:
        variant.cfg = variant.cfg.model_copy(update={"norm_feedback": True})
    assert (out.logits[-1] - run["out_hf"].logits).abs().max() > 1e-2


def test_one_to_one_losses(run):
    """HF's loss terms (unweighted in ``loss_dict``; weights 1 / 5 / 2) equal codetr's criterion: the last layer,
    and with ``auxiliary_loss`` every layer."""
    hf_losses, cfg, ours, r = run["out_hf"].loss_dict, run["cfg"], run["losses"], {}
    n = cfg.decoder_layers
    total = 0.0
    for k in range(n) if cfg.auxiliary_loss else [n - 1]:
        hf_suffix, pre = ("", "") if k == n - 1 else (f"_{k}", f"d{k}.")
        close(f"{pre}loss_cls", ours[f"{pre}loss_cls"], hf_losses[f"loss_ce{hf_suffix}"] * 1.0, r)
        close(f"{pre}loss_bbox", ours[f"{pre}loss_bbox"],
              hf_losses[f"loss_bbox{hf_suffix}"] * cfg.bbox_loss_coefficient, r)
        close(f"{pre}loss_iou", ours[f"{pre}loss_iou"],
              hf_losses[f"loss_giou{hf_suffix}"] * cfg.giou_loss_coefficient, r)
        total = total + ours[f"{pre}loss_cls"] + ours[f"{pre}loss_bbox"] + ours[f"{pre}loss_iou"]
    close("loss (HF total)", total, run["out_hf"].loss, r)
    print(run["case"], "conditional loss parity (max abs diff):", r)


def test_predict_runs_on_converted_model(run):
    dets = run["model"].predict(padded_batch())
    assert len(dets) == 2 and all(len(d.scores) == 100 for d in dets)  # top-100 of 20 queries x 7 classes


def test_key_map_examples():
    key = lambda k: hf_single_scale_key(k, "conditional_detr")  # noqa: E731
    assert key("model.backbone.model.embedder.embedder.convolution.weight") == "backbone.conv1.weight"
    assert key("model.input_projection.bias") == "neck.convs.0.conv.bias"
    assert key("model.query_position_embeddings.weight") == "variant.query_embedding.weight"
    assert key("model.encoder.layers.1.self_attn.o_proj.weight") == "variant.encoder.layers.1.self_attn.out_proj.weight"
    assert key("model.encoder.layers.1.mlp.fc2.bias") == "variant.encoder.layers.1.ffn.fc2.bias"
    assert key("model.decoder.layers.0.encoder_attn.q_pos_sine_proj.weight") == \
        "variant.decoder.layers.0.cross_attn.q_pos_sine.weight"
    assert key("model.decoder.layers.1.encoder_attn_layer_norm.bias") == "variant.decoder.layers.1.norm2.bias"
    assert key("model.decoder.ref_point_head.layers.1.weight") == "variant.decoder.ref_point_head.layers.1.weight"
    assert key("class_labels_classifier.bias") == "variant.class_heads.0.bias"
    assert key("bbox_predictor.layers.2.weight") == "variant.box_heads.0.layers.2.weight"
    assert key("model.something_new.weight") is None


def test_recipe_rejects_what_codetr_cannot_build():
    assert hf_conditional_recipe_model(hf_config(auxiliary_loss=True))["variant"]["norm_feedback"] is True
    with pytest.raises(ValueError, match="FFN"):
        hf_conditional_recipe_model(hf_config(decoder_ffn_dim=256))
    with pytest.raises(ValueError, match="activation"):
        hf_conditional_recipe_model(hf_config(activation_function="gelu"))
    model = hf_conditional_recipe_model(hf_config())
    assert model["num_levels"] == 1 and model["backbone"]["out_indices"] == [4]
    assert model["criterion"]["cls_weight"] == 1.0 and model["variant"]["prior_prob"] == 0.5
