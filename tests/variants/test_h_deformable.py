"""H-Deformable-DETR (the hybrid one-to-many branch of the Deformable family): query counts at training and test,
the two-way attention mask, repeated targets, loss names and weights, test-time independence from the one-to-many
queries, and "hybrid off" = Deformable-DETR++ bit for bit."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from codetr.core.config.criterion import SetCriterionConfig
from codetr.core.interfaces import EXTRAS_TOPK_BOXES_UNACT, QueryGroup
from codetr.core.structures import Batch, Target
from codetr.heads.criterion import SetCriterion
from codetr.variants.deformable import (ONE2MANY, PRESETS, DeformableDETR, DeformableDETRConfig, build,
                                        hybrid_attention_mask)

SMALL = dict(hidden_dim=64, num_queries=6, num_levels=2, num_classes=5, num_decoder_layers=2,
             num_encoder_layers=1, num_heads=4, num_points=2, ffn_dim=96)
STRIDES = [8, 16]


def _model(seed: int = 0, **kw) -> DeformableDETR:
    torch.manual_seed(seed)
    m = build(DeformableDETRConfig(**{"preset": "h_deformable_detr", **SMALL, "num_queries_one2many": 10, **kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make zero-initialised tensors non-trivial
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _inputs(m: DeformableDETR, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(2, 64, 8, 10, generator=g), torch.randn(2, 64, 4, 5, generator=g)]
    masks = [torch.zeros(2, 8, 10, dtype=torch.bool), torch.zeros(2, 4, 5, dtype=torch.bool)]
    masks[0][1, :, 7:] = True
    masks[1][1, :, 4:] = True
    return m.prepare(levels, masks, STRIDES)


def _batch() -> Batch:
    t0 = Target(torch.tensor([[4.0, 6.0, 30.0, 40.0], [40.0, 10.0, 70.0, 50.0]]), torch.tensor([1, 3]),
                torch.zeros(2, dtype=torch.bool))
    t1 = Target(torch.tensor([[2.0, 2.0, 20.0, 30.0]]), torch.tensor([4]), torch.zeros(1, dtype=torch.bool))
    return Batch(images=torch.zeros(2, 3, 64, 80), masks=torch.zeros(2, 64, 80, dtype=torch.bool),
                 targets=[t0, t1], image_sizes=torch.tensor([[64, 80], [64, 56]]),
                 orig_sizes=torch.tensor([[64, 80], [64, 56]]), image_ids=[0, 1])


def _criterion() -> SetCriterion:
    return SetCriterion(SetCriterionConfig(cls_weight=2.0, enc_loss="binary",
                                           matcher={"type": "hungarian", "cost_class": 2.0}))


# --------------------------------------------------------------------------- config
def test_preset_is_deformable_pp_plus_the_hybrid_branch():
    cfg = DeformableDETRConfig(preset="h_deformable_detr")
    for k, v in PRESETS["deformable_detr_pp"].items():
        assert getattr(cfg, k) == v
    assert (cfg.num_queries_one2many, cfg.k_one2many, cfg.lambda_one2many) == (1500, 6, 1.0)
    assert build(DeformableDETRConfig(preset="h_deformable_detr", num_classes=3, num_encoder_layers=1,
                                      num_decoder_layers=1)).query_embedding.weight.shape == (1800, 256)
    with pytest.raises(ValidationError, match="two_stage_num_proposals"):
        DeformableDETRConfig(preset="h_deformable_detr", two_stage_num_proposals=400)


def test_hand_made_two_way_mask():
    want = torch.tensor([[0, 0, 1, 1, 1],
                         [0, 0, 1, 1, 1],
                         [1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(hybrid_attention_mask(2, 5), want)


# --------------------------------------------------------------------------- query counts
def test_query_counts_train_and_test():
    m = _model()
    inputs = _inputs(m)
    m.train()
    mem = m.encode(inputs)
    assert mem.extras[EXTRAS_TOPK_BOXES_UNACT].shape[1] == 16 and m.min_tokens == 16
    (group,) = m.make_queries(mem, _batch())
    assert group.content.shape[1] == 16 and group.self_attn_mask.shape == (16, 16)
    assert torch.equal(group.self_attn_mask, hybrid_attention_mask(6, 16))
    (main_only,) = m.make_queries(mem, None)  # no batch: inference queries even in train mode
    assert main_only.content.shape[1] == 6 and main_only.self_attn_mask is None
    m.eval()
    mem = m.encode(inputs)
    assert mem.extras[EXTRAS_TOPK_BOXES_UNACT].shape[1] == 6 and m.min_tokens == 6
    (group,) = m.make_queries(mem, _batch())
    assert group.content.shape[1] == 6 and group.self_attn_mask is None and "one2one_num_queries" not in group.extras


def test_top_k_at_test_is_the_head_of_the_training_top_k():
    m = _model()
    inputs = _inputs(m)
    with torch.no_grad():
        m.train()
        train_topk = m.encode(inputs).extras[EXTRAS_TOPK_BOXES_UNACT]
        m.eval()
        test_topk = m.encode(inputs).extras[EXTRAS_TOPK_BOXES_UNACT]
    assert torch.equal(train_topk[:, :6], test_topk)


# --------------------------------------------------------------------------- the mask separates the groups
@torch.no_grad()
def test_masked_joint_decoding_equals_decoding_each_part_alone():
    m = _model()
    inputs = _inputs(m)
    m.train()
    mem = m.encode(inputs)
    (group,) = m.make_queries(mem, _batch())
    joint = m.decode(group, mem)
    parts = dict((p.name, o) for p, o in m.split_outputs(group, joint))
    assert set(parts) == {"main", ONE2MANY}
    for name, sl in (("main", slice(0, 6)), (ONE2MANY, slice(6, None))):
        alone = m.decode(QueryGroup(name=name, content=group.content[:, sl], reference=group.reference[:, sl],
                                    pos=group.pos[:, sl]), mem)
        torch.testing.assert_close(parts[name].logits, alone.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(parts[name].boxes, alone.boxes, rtol=0, atol=1e-5)


@torch.no_grad()
def test_predictions_at_test_do_not_depend_on_one2many_queries():
    m = _model().eval()
    inputs = _inputs(m)

    def predict():
        mem = m.encode(inputs)
        (group,) = m.make_queries(mem, None)
        return m.decode(group, mem)

    before = predict()
    m.query_embedding.weight[6:].normal_()
    after = predict()
    assert torch.equal(before.logits, after.logits) and torch.equal(before.boxes, after.boxes)


# --------------------------------------------------------------------------- losses
def test_repeated_targets_are_matched_like_a_hand_repeated_batch():
    m = _model().train()
    crit = _criterion()
    batch = _batch()
    mem = m.encode(_inputs(m))
    (group,) = m.make_queries(mem, batch)
    many_group, many = m.split_outputs(group, m.decode(group, mem))[1]
    got = m.group_loss(many_group, many, batch, crit)
    repeated = Batch(images=batch.images, masks=batch.masks, image_sizes=batch.image_sizes,
                     orig_sizes=batch.orig_sizes, image_ids=batch.image_ids,
                     targets=[Target(torch.cat([t.boxes] * 6), torch.cat([t.labels] * 6),
                                     torch.zeros(6 * len(t.labels), dtype=torch.bool)) for t in batch.targets])
    plain = SetCriterion(SetCriterionConfig(cls_weight=2.0, enc_loss="none",
                                            matcher={"type": "hungarian", "cost_class": 2.0}))
    want = plain(many, repeated)
    assert set(got) == {k + "_one2many" for k in want}
    assert set(got) == {"loss_cls_one2many", "loss_bbox_one2many", "loss_iou_one2many",
                        "d0.loss_cls_one2many", "d0.loss_bbox_one2many", "d0.loss_iou_one2many"}
    for k, v in want.items():
        torch.testing.assert_close(got[k + "_one2many"], v, rtol=0, atol=0)
    # another repeat count, suffix and weight
    assert crit.repeated_target_loss(many, batch, 2, suffix="_x", weight=2.0)["loss_bbox_x"] > 0


def test_lambda_one2many_scales_only_the_hybrid_terms():
    losses = {}
    for lam in (1.0, 0.5):
        m = _model(lambda_one2many=lam).train()
        batch = _batch()
        mem = m.encode(_inputs(m))
        (group,) = m.make_queries(mem, batch)
        out = {}
        crit = _criterion()
        for part, part_out in m.split_outputs(group, m.decode(group, mem)):
            out.update(crit(part_out, batch, mem.extras) if part.name == "main"
                       else m.group_loss(part, part_out, batch, crit))
        losses[lam] = out
    for k, v in losses[1.0].items():
        factor = 0.5 if k.endswith("_one2many") else 1.0
        torch.testing.assert_close(losses[0.5][k], factor * v, rtol=1e-6, atol=0)
    assert "enc_loss_cls" in losses[1.0] and "enc_loss_cls_one2many" not in losses[1.0]


# --------------------------------------------------------------------------- hybrid off = Deformable-DETR++
def test_hybrid_off_is_deformable_pp_bit_for_bit():
    torch.manual_seed(0)
    pp = build(DeformableDETRConfig(preset="deformable_detr_pp", **SMALL))
    torch.manual_seed(0)
    off = build(DeformableDETRConfig(preset="h_deformable_detr", **SMALL, num_queries_one2many=0))
    sd_pp, sd_off = pp.state_dict(), off.state_dict()
    assert list(sd_pp) == list(sd_off)
    assert all(torch.equal(sd_pp[k], sd_off[k]) for k in sd_pp)
    batch, crit = _batch(), _criterion()
    for mode in ("train", "eval"):
        results = []
        for m in (pp, off):
            getattr(m, mode)()
            torch.manual_seed(1)
            mem = m.encode(_inputs(m))
            groups = m.make_queries(mem, batch)
            assert len(groups) == 1 and groups[0].self_attn_mask is None
            out = m.decode(groups[0], mem)
            results.append((out, crit(out, batch, mem.extras)))
        (a, la), (b, lb) = results
        assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)
        assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
