"""What the deformable variants share (:mod:`codetr.variants.base`): the ``Memory.extras`` contract (one key =
one meaning in every variant), the shared-field checks and the :class:`~codetr.core.interfaces.Criterion`
protocol the variants' ``group_loss`` is typed with."""

from __future__ import annotations

import pytest
import torch

from codetr.core import interfaces as itf
from codetr.core.interfaces import (EXTRAS_ENC_BOXES, EXTRAS_ENC_BOXES_UNACT_ALL, EXTRAS_ENC_LOGITS,
                                    EXTRAS_ENC_LOGITS_ALL, EXTRAS_ENC_PROPOSALS_UNACT, EXTRAS_ENC_VALID,
                                    EXTRAS_TOPK_BOXES_UNACT, EXTRAS_TOPK_INDICES, Criterion)
from codetr.heads import criterion as criterion_mod
from codetr.variants import deformable, dino
from codetr.variants.base import DeformableVariant

SMALL = dict(hidden_dim=64, num_queries=12, num_levels=3, num_classes=5, num_decoder_layers=2,
             num_encoder_layers=2, num_heads=4, num_points=2, ffn_dim=96)
SHAPES = [(8, 10), (4, 5), (2, 3)]
EXTRAS_KEYS = {v for k, v in vars(itf).items() if k.startswith("EXTRAS_")}


def _encode(model: DeformableVariant):
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, 64, h, w, generator=g) for h, w in SHAPES]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in SHAPES]
    for m in masks:  # image 1 is padded on the right
        m[1, :, m.shape[-1] * 2 // 3:] = True
    return model.encode(model.prepare(levels, masks, [8, 16, 32]))


def _variants() -> list[DeformableVariant]:
    torch.manual_seed(0)
    models = [deformable.build(deformable.DeformableDETRConfig(**SMALL, preset="deformable_detr_pp")),
              deformable.build(deformable.DeformableDETRConfig(**SMALL, two_stage=True, two_stage_num_proposals=7)),
              dino.build(dino.DINOConfig(**SMALL))]
    return [m.eval() for m in models]


def test_extras_keys_mean_the_same_in_every_variant():
    s = sum(h * w for h, w in SHAPES)
    for model in _variants():
        memory = _encode(model)
        ex = memory.extras
        assert set(ex) == EXTRAS_KEYS, type(model).__name__
        k = min(model.num_proposals, s)
        assert ex[EXTRAS_ENC_LOGITS_ALL].shape == (2, s, 5)
        assert ex[EXTRAS_ENC_BOXES_UNACT_ALL].shape == ex[EXTRAS_ENC_PROPOSALS_UNACT].shape == (2, s, 4)
        assert ex[EXTRAS_ENC_VALID].shape == (2, s) and ex[EXTRAS_ENC_VALID].dtype == torch.bool
        assert not ex[EXTRAS_ENC_VALID][1].all()  # padding
        topk = ex[EXTRAS_TOPK_INDICES]
        assert topk.shape == (2, k) and topk.dtype == torch.int64
        gathered = torch.gather(ex[EXTRAS_ENC_BOXES_UNACT_ALL], 1, topk[..., None].expand(-1, -1, 4))
        assert torch.equal(ex[EXTRAS_TOPK_BOXES_UNACT], gathered) and not ex[EXTRAS_TOPK_BOXES_UNACT].requires_grad
        assert ex[EXTRAS_ENC_VALID].gather(1, topk).all()  # invalid tokens ranked last (two_stage_mask_invalid)
        # the decoder starts from the selected proposals
        assert torch.equal(model.make_queries(memory, None)[0].reference, gathered.sigmoid())
        # EXTRAS_ENC_LOGITS / EXTRAS_ENC_BOXES: what the encoder loss trains, the variant's official choice
        if isinstance(model, deformable.DeformableDETR):  # every token (class-agnostic "binary" loss)
            assert ex[EXTRAS_ENC_LOGITS] is ex[EXTRAS_ENC_LOGITS_ALL]
            assert torch.equal(ex[EXTRAS_ENC_BOXES], ex[EXTRAS_ENC_BOXES_UNACT_ALL].sigmoid())
            assert torch.equal(topk, ex[EXTRAS_ENC_LOGITS_ALL][..., 0].masked_fill(
                ~ex[EXTRAS_ENC_VALID], float("-inf")).topk(k, 1)[1])
        else:  # the top-k by max class logit ("class" loss)
            all_logits = ex[EXTRAS_ENC_LOGITS_ALL]
            assert torch.equal(ex[EXTRAS_ENC_LOGITS], torch.gather(all_logits, 1, topk[..., None].expand(-1, -1, 5)))
            assert torch.equal(ex[EXTRAS_ENC_BOXES], gathered.sigmoid())
            assert torch.equal(topk, all_logits.max(-1)[0].masked_fill(~ex[EXTRAS_ENC_VALID], float("-inf"))
                               .topk(k, 1)[1])
        assert ex[EXTRAS_ENC_LOGITS].requires_grad and ex[EXTRAS_ENC_BOXES].requires_grad


def test_one_stage_has_no_extras():
    torch.manual_seed(0)
    assert _encode(deformable.build(deformable.DeformableDETRConfig(**SMALL))).extras == {}


def test_criterion_reads_the_interface_constants():
    assert criterion_mod.ENC_LOGITS_KEY is EXTRAS_ENC_LOGITS and criterion_mod.ENC_BOXES_KEY is EXTRAS_ENC_BOXES


def test_set_criterion_satisfies_the_criterion_protocol():
    assert isinstance(criterion_mod.SetCriterion(), Criterion)
    assert not isinstance(torch.nn.Linear(1, 1), Criterion)


@pytest.mark.parametrize("mod, cfg_cls, type_name", [(deformable, deformable.DeformableDETRConfig, "deformable_detr"),
                                                     (dino, dino.DINOConfig, "dino")])
def test_missing_shared_fields_use_require_shared(mod, cfg_cls, type_name):
    with pytest.raises(ValueError, match=rf"^{type_name} \({cfg_cls.__name__}\): num_classes not set"):
        mod.build(cfg_cls())
    variant_cls = deformable.DeformableDETR if mod is deformable else dino.DINO
    with pytest.raises(ValueError, match="hidden_dim, num_levels, num_decoder_layers, num_queries not set. "
                                         "A recipe injects it from model.hidden_dim"):
        variant_cls(cfg_cls(num_classes=3))
