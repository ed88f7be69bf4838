"""Unit tests of the DINO variant: config, init, state-dict layout, contrastive denoising (mask, dynamic groups,
empty / mixed batches, noise bounds, injection), joint DN + matching decoding and its split, extra query groups,
padding invariance, the detector integration, soft-NMS and the mmdet-3 converters' key maps."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from codetr.core.detector import Detector
from codetr.core.interfaces import QueryGroup
from codetr.core.registry import ComponentConfig
from codetr.core.structures import Batch, Target, cxcywh_to_xyxy
from codetr.heads.criterion import SetCriterion, SetCriterionConfig
from codetr.ops.soft_nms import batched_soft_nms, soft_nms
from codetr.variants.dino import (COMPONENT, DINO, DenoisingGenerator, DINOConfig, build, dn_attention_mask,
                                  dn_num_groups)
from codetr.variants.postprocess import postprocess

SMALL = dict(hidden_dim=64, num_queries=12, num_levels=3, num_classes=5, num_decoder_layers=2,
             num_encoder_layers=2, num_heads=4, num_points=2, ffn_dim=96)
STRIDES = [8, 16, 32]


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _model(seed: int = 0, **kw) -> DINO:
    torch.manual_seed(seed)
    m = build(DINOConfig(**{**SMALL, **kw}))
    _perturb(m, seed)
    return m.eval()


def _levels(shapes, batch=1, seed=0, c=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=g) for h, w in shapes]


def _no_mask(levels):
    return [torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool) for x in levels]


def _target(boxes, labels) -> Target:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return Target(boxes, torch.tensor(labels, dtype=torch.long), torch.zeros(len(labels), dtype=torch.bool))


def _batch(targets, hw=(64, 80)) -> Batch:
    b = len(targets)
    return Batch(images=torch.zeros(b, 3, *hw), masks=torch.zeros(b, *hw, dtype=torch.bool), targets=targets,
                 image_sizes=torch.tensor([hw] * b), orig_sizes=torch.tensor([hw] * b))


SHAPES = [(8, 10), (4, 5), (2, 3)]


# --------------------------------------------------------------------------- config / init / layout
def test_config_defaults_and_strictness():
    cfg = DINOConfig()
    assert (cfg.num_encoder_layers, cfg.num_heads, cfg.num_points, cfg.ffn_dim, cfg.dropout) == (6, 8, 4, 2048, 0.0)
    assert (cfg.pe_temperature, cfg.pe_offset) == (20, 0.0)
    assert (cfg.num_dn_queries, cfg.label_noise_scale, cfg.box_noise_scale, cfg.with_dn) == (100, 0.5, 1.0, True)
    assert (cfg.pred_ref_eps, cfg.two_stage_mask_invalid, cfg.query_pos_frame) == (1e-3, True, "canvas")
    assert cfg.hidden_dim is None and cfg.num_queries is None  # shared fields: injected by the recipe
    assert issubclass(COMPONENT.config, ComponentConfig) and COMPONENT.build is build
    with pytest.raises(ValidationError):
        DINOConfig(unknown=1)
    with pytest.raises(ValidationError):
        DINOConfig(num_dn_queries=0)
    with pytest.raises(ValueError, match="num_classes"):
        build(DINOConfig())
    m = build(DINOConfig(num_classes=3, num_decoder_layers=1, num_encoder_layers=1))
    assert (m.num_queries, m.num_levels, m.hidden_dim) == (900, 4, 256)


def test_official_init_and_state_dict_layout():
    torch.manual_seed(0)
    m = build(DINOConfig(**SMALL))
    bias = -math.log(0.99 / 0.01)
    assert len(m.class_heads) == len(m.box_heads) == SMALL["num_decoder_layers"] + 1
    for h in m.class_heads:
        assert torch.allclose(h.bias, torch.full_like(h.bias, bias))
    for h in m.box_heads:
        assert h.layers[-1].weight.abs().max() == 0 and h.layers[-1].bias.abs().max() == 0
    assert m.class_heads[0].weight.data_ptr() != m.class_heads[1].weight.data_ptr()  # not shared
    keys = set(m.state_dict())
    for k in ("level_embed", "encoder.layers.1.self_attn.sampling_offsets.weight", "decoder.layers.1.norm3.bias",
              "decoder.ref_point_head.layers.0.weight", "decoder.ref_point_head.layers.1.bias", "decoder.norm.weight",
              "class_heads.2.weight", "box_heads.2.layers.2.bias", "enc_output.weight", "enc_output_norm.bias",
              "query_embedding.weight", "denoising.label_embedding.weight"):
        assert k in keys, k
    assert m.decoder.ref_point_head.layers[0].weight.shape == (64, 128)
    assert m.denoising.label_embedding.weight.shape == (5, 64)
    assert "denoising.label_embedding.weight" not in build(DINOConfig(**SMALL, with_dn=False)).state_dict()


# --------------------------------------------------------------------------- denoising pieces
def test_dynamic_group_count():
    assert dn_num_groups(100, 3) == 33
    assert dn_num_groups(20, 3) == 6
    assert dn_num_groups(100, 100) == 1
    assert dn_num_groups(100, 250) == 1  # at least one group
    assert dn_num_groups(100, 0) == 1


def test_dn_attention_mask_structure():
    pad, groups, q = 2, 3, 5
    n = 2 * pad * groups
    mask = dn_attention_mask(n, 2 * pad, q)
    assert mask.shape == (n + q, n + q) and mask.dtype == torch.bool
    assert mask[n:, :n].all()            # matching queries cannot see DN
    assert not mask[n:, n:].any()        # matching queries see each other
    assert not mask[:n, n:].any()        # DN queries see the matching queries
    for g in range(groups):
        rows = slice(g * 2 * pad, (g + 1) * 2 * pad)
        assert not mask[rows, rows].any()                    # own group visible
        others = torch.ones(n, dtype=torch.bool)
        others[rows] = False
        assert mask[rows, :n][:, others].all()               # other groups blocked
    assert not dn_attention_mask(0, 0, q).any()


def test_dn_layout_targets_and_mixed_batch():
    gen = DenoisingGenerator(num_classes=5, hidden_dim=8, num_dn_queries=10, label_noise_scale=0.0,
                             box_noise_scale=0.0)
    labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long), torch.tensor([4])]
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.9, 0.8]]), torch.zeros(0, 4),
             torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    dn = gen(labels, boxes)
    assert dn.num_groups == 5 and dn.group_size == 4 and dn.num_queries == 20
    assert dn.content.shape == (3, 20, 8) and dn.boxes_unact.shape == (3, 20, 4)
    t = dn.targets
    assert t.num_pos == 2 * 5 + 1 * 5
    emb = gen.label_embedding.weight
    for g in range(5):
        s = 4 * g
        # image 0: positives at s, s+1; negatives at s+2, s+3 (same GT, zero noise)
        assert t.labels[0, s:s + 4].tolist() == [1, 3, 5, 5] and t.box_weights[0, s:s + 4].tolist() == [1, 1, 0, 0]
        assert torch.equal(dn.content[0, s], emb[1]) and torch.equal(dn.content[0, s + 3], emb[3])
        # image 2: one GT -> slot s positive, slot s+1 padding
        assert t.labels[2, s:s + 4].tolist() == [4, 5, 5, 5] and t.box_weights[2, s:s + 4].tolist() == [1, 0, 0, 0]
        assert torch.equal(dn.content[2, s + 2], emb[4]) and dn.content[2, s + 1].abs().max() == 0
    # image 1 has no GT: all padding (zero content, box query 0 -> reference 0.5), background targets
    assert dn.content[1].abs().max() == 0 and dn.boxes_unact[1].abs().max() == 0
    assert (t.labels[1] == 5).all() and t.box_weights[1].sum() == 0 and (t.label_weights == 1).all()
    # zero noise: the box query is the GT (cxcywh, logit space with eps 1e-3)
    ref = dn.boxes_unact[0, :2].sigmoid()
    torch.testing.assert_close(cxcywh_to_xyxy(ref), boxes[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(t.boxes[0, :2], ref, atol=1e-5, rtol=0)
    # a full-image box: w = h = 1 -> inverse_sigmoid clamps (1 - x) to eps = 1e-3
    assert dn.boxes_unact[2, 0].tolist() == pytest.approx([0.0, 0.0, math.log(1e3), math.log(1e3)], abs=1e-4)


def test_dn_empty_batch_has_no_queries():
    gen = DenoisingGenerator(num_classes=5, hidden_dim=8, num_dn_queries=10)
    dn = gen([torch.zeros(0, dtype=torch.long)] * 2, [torch.zeros(0, 4)] * 2)
    assert dn.num_queries == 0 and dn.num_groups == 1 and dn.targets.num_pos == 0
    assert dn.content.shape == (2, 0, 8) and dn.targets.labels.shape == (2, 0)


def test_dn_noise_bounds():
    torch.manual_seed(0)
    scale = 0.4  # <= 0.5: a negative box cannot turn inside out (which would clamp w or h to 0)
    gen = DenoisingGenerator(num_classes=7, hidden_dim=8, num_dn_queries=400, label_noise_scale=1.0,
                             box_noise_scale=scale)
    g = torch.Generator().manual_seed(1)
    n = 40
    xy = torch.rand(n, 2, generator=g) * 0.2 + 0.3
    wh = torch.rand(n, 2, generator=g) * 0.15 + 0.05
    gt = torch.cat([xy, xy + wh], 1)  # corners stay in [0.14, 0.86] for any noise: no clamping
    labels = torch.randint(0, 7, (n,), generator=g)
    groups = 10
    noisy_labels, unact = gen.noisy_queries(labels, gt, groups)
    assert noisy_labels.shape == (2 * groups * n,) and unact.shape == (2 * groups * n, 4)
    assert ((noisy_labels >= 0) & (noisy_labels < 7)).all()
    changed = (noisy_labels != labels.repeat(2 * groups)).float().mean()
    assert 0.25 < changed < 0.55  # flip probability scale/2 = 0.5, redrawn class can equal the original
    boxes = cxcywh_to_xyxy(unact.sigmoid()).view(2 * groups, n, 4)
    half = (wh.repeat(1, 2) / 2 * scale)[None]
    rel = (boxes - gt[None]).abs() / half  # corner displacement in units of scale * half size
    pos, neg = rel[0::2], rel[1::2]
    assert pos.max() < 1 + 1e-3 and neg.min() > 1 - 1e-3 and neg.max() < 2 + 1e-3
    assert pos.mean() < 0.6 and neg.mean() > 1.4
    # clamping to the image
    edge = torch.tensor([[0.0, 0.0, 0.3, 0.3]])
    _, u = gen.noisy_queries(torch.tensor([1]), edge, 50)
    b = cxcywh_to_xyxy(u.sigmoid())
    assert b.min() >= -1e-4 and b.max() <= 1 + 1e-4


def test_dn_injected_noise_and_seeded_reproducibility():
    gen = DenoisingGenerator(num_classes=5, hidden_dim=8, num_dn_queries=4)
    labels, boxes = [torch.tensor([1, 2])], [torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.3, 0.2, 0.6, 0.9]])]
    torch.manual_seed(3)
    a = gen(labels, boxes)
    torch.manual_seed(3)
    b = gen(labels, boxes)
    assert torch.equal(a.boxes_unact, b.boxes_unact) and torch.equal(a.noisy_labels, b.noisy_labels)
    fake_labels = torch.tensor([4, 4, 0, 0, 3, 3, 2, 2])
    fake_boxes = torch.linspace(-1, 1, 32).view(8, 4)
    state = torch.get_rng_state()
    with gen.injected_noise(fake_labels, fake_boxes):
        c = gen(labels, boxes)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    assert torch.equal(c.noisy_labels, fake_labels) and torch.equal(c.boxes_unact[0], fake_boxes)
    assert torch.equal(c.content[0, 0], gen.label_embedding.weight[4])
    assert gen._injected is None
    with pytest.raises(ValueError, match="needs 8"):
        with gen.injected_noise(fake_labels[:4], fake_boxes[:4]):
            gen(labels, boxes)


# --------------------------------------------------------------------------- joint decoding
def _encode(m: DINO, levels, masks=None):
    masks = masks or _no_mask(levels)
    return m.encode(m.prepare(levels, masks, STRIDES[:len(levels)]))


def test_make_queries_with_dn_and_split():
    m = _model()
    lv = _levels(SHAPES, batch=2)
    batch = _batch([_target([[4, 4, 30, 40], [40, 10, 70, 60]], [1, 2]), _target([[0, 0, 80, 64]], [4])])
    with torch.no_grad():
        mem = _encode(m, lv)
        (main_only,) = m.make_queries(mem, None)
        (group,) = m.make_queries(mem, batch)
    assert main_only.name == "main" and main_only.self_attn_mask is None and main_only.content.shape == (2, 12, 64)
    n = group.extras["dn_num_queries"]
    assert group.name == "main" and group.extras["dn_num_groups"] == 50 and n == 2 * 2 * 50  # 100 // max 2 GT
    assert group.content.shape == (2, n + 12, 64) and group.self_attn_mask.shape == (n + 12, n + 12)
    assert torch.equal(group.content[:, n:], main_only.content) and torch.equal(group.reference[:, n:],
                                                                               main_only.reference)
    with torch.no_grad():
        out = m.decode(group, mem)
        ref = m.decode(main_only, mem)
    parts = m.split_outputs(group, out)
    assert [p.name for p, _ in parts] == ["dn", "main"]
    (dn, dn_out), (main, main_out) = parts
    assert dn_out.logits.shape == (2, 2, n, 5) and main_out.boxes.shape == (2, 2, 12, 4)
    assert dn.extras["dn_targets"].labels.shape == (2, n)
    # matching queries cannot see the DN queries: identical to decoding them alone
    for name in ("logits", "boxes", "hidden", "references"):
        torch.testing.assert_close(getattr(main_out, name), getattr(ref, name), atol=2e-5, rtol=0)
    # DN groups cannot see each other: changing group 1's queries leaves group 0 unchanged
    gsize = group.extras["dn_group_size"]
    other = QueryGroup("main", group.content.clone(), group.reference.clone(), None, group.self_attn_mask,
                       group.extras)
    other.content[:, gsize:2 * gsize] += 1.0
    with torch.no_grad():
        out2 = m.decode(other, mem)
    torch.testing.assert_close(out2.logits[:, :, :gsize], out.logits[:, :, :gsize], atol=2e-5, rtol=0)
    assert not torch.allclose(out2.logits[:, :, gsize:2 * gsize], out.logits[:, :, gsize:2 * gsize])
    assert m.split_outputs(main_only, ref) == [(main_only, ref)]
    assert len(m.make_queries(mem, batch)) == 1
    assert build(DINOConfig(**SMALL, with_dn=False)).make_queries(mem, batch)[0].self_attn_mask is None


def test_extra_query_group_without_pos_and_errors():
    m = _model()
    lv = _levels(SHAPES)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        mem = _encode(m, lv)
        ref = torch.rand(1, 7, 4, generator=g) * 0.5 + 0.25
        aux = QueryGroup("aux0", torch.randn(1, 7, 64, generator=g), ref)
        out = m.decode(aux, mem)
    assert out.logits.shape == (2, 1, 7, 5) and torch.equal(out.references[0], ref)
    assert m.split_outputs(aux, out)[0][1] is out
    with pytest.raises(ValueError, match="positional"):
        m.decode(QueryGroup("aux0", aux.content, ref, pos=torch.zeros(1, 7, 64)), mem)
    with pytest.raises(ValueError, match="4-D"):
        m.decode(QueryGroup("aux0", aux.content, ref[..., :2]), mem)


def test_refinement_and_look_forward_twice_semantics():
    m = _model()
    lv = _levels(SHAPES)
    mem = _encode(m, lv)
    (group,) = m.make_queries(mem, None)
    out = m.decode(group, mem)
    # the reference of layer 1 is refined from the layer-0 output BEFORE the output norm
    with torch.no_grad():
        assert torch.equal(out.references[0], group.reference)
        assert not torch.allclose(out.references[1], out.boxes[0], atol=1e-6)
    # look-forward-twice: layer-1 boxes back-propagate into the layer-0 box head (through the reference)
    out.boxes[1].sum().backward()
    assert m.box_heads[0].layers[0].weight.grad is not None and m.box_heads[0].layers[0].weight.grad.abs().sum() > 0
    assert m.box_heads[2].layers[0].weight.grad is None  # encoder head: references are detached


@pytest.mark.parametrize("frame", ["canvas", "image"])
def test_padding_invariance(frame):
    """``query_pos_frame: image``: every image of a padded batch decodes as if alone (batch size 1). The official
    ``canvas`` frame embeds ``reference * valid_ratio`` in the positional queries, so there only the unpadded
    image does; the encoder side (memory, proposals) is padding invariant in both."""
    m = _model(query_pos_frame=frame)
    big, small = [(12, 15), (6, 8), (3, 4)], [(9, 10), (5, 5), (3, 3)]
    a, b, junk = _levels(big, seed=1), _levels(small, seed=2), _levels(big, seed=3)
    lvs, masks = [], []
    for la, lb, lj, (h, w) in zip(a, b, junk, small):
        pad = lj.clone()
        pad[..., :h, :w] = lb
        mb = torch.ones(1, *la.shape[-2:], dtype=torch.bool)
        mb[:, :h, :w] = False
        lvs.append(torch.cat([la, pad]))
        masks.append(torch.cat([torch.zeros_like(mb), mb]))
    with torch.no_grad():
        mem2 = _encode(m, lvs, masks)
        out2 = m.decode(m.make_queries(mem2, None)[0], mem2)
        mem_a = _encode(m, a)
        out_a = m.decode(m.make_queries(mem_a, None)[0], mem_a)
        mem_b = _encode(m, b)
        out_b = m.decode(m.make_queries(mem_b, None)[0], mem_b)
    torch.testing.assert_close(out2.logits[:, 0], out_a.logits[:, 0], atol=2e-5, rtol=0)
    torch.testing.assert_close(out2.boxes[:, 0], out_a.boxes[:, 0], atol=2e-5, rtol=0)
    if frame == "image":
        torch.testing.assert_close(out2.logits[:, 1], out_b.logits[:, 0], atol=2e-5, rtol=0)
        torch.testing.assert_close(out2.boxes[:, 1], out_b.boxes[:, 0], atol=2e-5, rtol=0)
    else:
        assert not torch.allclose(out2.logits[:, 1], out_b.logits[:, 0], atol=1e-3)
    # the encoder side (memory of the valid tokens, proposals, top-k) is padding invariant
    start2, start1, valid = 0, 0, []
    for (h2, w2), (h1, w1) in zip(big, small):
        tok = mem2.memory[1, start2:start2 + h2 * w2].view(h2, w2, -1)[:h1, :w1].reshape(h1 * w1, -1)
        valid.append((tok - mem_b.memory[0, start1:start1 + h1 * w1]).abs().max())
        start2, start1 = start2 + h2 * w2, start1 + h1 * w1
    assert max(valid) < 2e-5


# --------------------------------------------------------------------------- detector integration
class _Identity(torch.nn.Module):
    out_strides = STRIDES

    def forward(self, x):
        return x


class _Backbone(torch.nn.Module):
    """images (B, 3, 64, 80) -> 3 maps of 64 channels at strides 8 / 16 / 32."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, 64, s, s) for s in STRIDES)

    def forward(self, x):
        return [c(x) for c in self.convs]


def _detector(**kw) -> Detector:
    m = _model(**kw).train()
    crit = SetCriterion(SetCriterionConfig(cls_loss="qfl", cls_weight=1.0, enc_loss="class"))
    torch.manual_seed(0)
    return Detector(_Backbone(), _Identity(), m, crit, postprocess, num_classes=5)


DN_KEYS = {f"{p}dn_loss_{t}" for p in ("", "d0.") for t in ("cls", "bbox", "iou")}


@pytest.mark.parametrize("targets", [
    [[[4, 4, 30, 40], [40, 10, 70, 60]], [[0, 0, 80, 64]]],   # both images with GT
    [[[4, 4, 30, 40]], []],                                    # mixed: one image without GT
    [[], []],                                                  # no GT at all: no DN queries
], ids=["full", "mixed", "empty"])
def test_detector_losses_with_dn(targets):
    det = _detector()
    tg = [_target(t, list(range(1, len(t) + 1))) if t else _target([], []) for t in targets]
    batch = _batch(tg)
    batch.images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    losses = det.loss(batch)
    one_to_one = {f"{p}{q}loss_{t}" for p in ("", "d0.") for q in ("",) for t in ("cls", "bbox", "iou")}
    enc = {f"enc_loss_{t}" for t in ("cls", "bbox", "iou")}
    assert set(losses) == one_to_one | enc | DN_KEYS
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    unused = [n for n, p in det.named_parameters() if p.grad is None]
    assert not unused, unused  # DDP without find_unused_parameters, also without any GT in the batch
    grad = det.variant.denoising.label_embedding.weight.grad
    if not any(targets):
        assert all(float(losses[k].detach()) == 0 for k in DN_KEYS) and grad.abs().sum() == 0
    else:
        assert float(losses["dn_loss_bbox"].detach()) > 0 and grad.abs().sum() > 0
    det.eval()
    dets = det.predict(batch)
    assert len(dets) == 2 and dets[0].boxes.shape == (min(100, 12 * 5), 4)


def test_detector_without_dn_has_no_dn_losses():
    det = _detector(with_dn=False)
    batch = _batch([_target([[4, 4, 30, 40]], [1])])
    assert not DN_KEYS & set(det.loss(batch))


# --------------------------------------------------------------------------- soft-NMS
def _soft_nms_reference(boxes, scores, thr, sigma=0.5, min_score=1e-3, method="linear"):
    """Line-by-line transcription of MMCV's CPU loop (scalar float32 arithmetic through numpy)."""
    import numpy as np

    f = np.float32
    x1, y1, x2, y2 = (list(map(f, boxes[:, i].tolist())) for i in range(4))
    sc = list(map(f, scores.tolist()))
    areas = [(x2[k] - x1[k]) * (y2[k] - y1[k]) for k in range(len(sc))]
    inds = list(range(len(sc)))
    n = len(sc)
    dets = []
    i = 0
    while i < n:
        mp = i
        for p in range(i + 1, n):
            if sc[mp] < sc[p]:
                mp = p
        for arr in (x1, y1, x2, y2, sc, areas, inds):
            arr[i], arr[mp] = arr[mp], arr[i]
        dets.append((x1[i], y1[i], x2[i], y2[i], sc[i]))
        p = i + 1
        while p < n:
            w = max(f(0), min(x2[i], x2[p]) - max(x1[i], x1[p]))
            h = max(f(0), min(y2[i], y2[p]) - max(y1[i], y1[p]))
            inter = f(w * h)
            ovr = f(inter / (areas[i] + areas[p] - inter))
            if method == "linear":
                weight = f(1) - ovr if ovr >= f(thr) else f(1)
            else:
                weight = f(np.exp(-(ovr * ovr) / f(sigma)))
            sc[p] = f(sc[p] * weight)
            if sc[p] < f(min_score):
                for arr in (x1, y1, x2, y2, sc, areas, inds):
                    arr[p] = arr[n - 1]
                n -= 1
                p -= 1
            p += 1
        i += 1
    return torch.tensor(dets, dtype=torch.float32).view(-1, 5), torch.tensor(inds[:n], dtype=torch.long)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_nms_matches_mmcv_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n = 120
    xy = torch.rand(n, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 5], 1)
    boxes[10:20] = boxes[0] + torch.rand(10, 4, generator=g)  # heavy overlaps
    scores = torch.rand(n, generator=g) * 0.05
    scores[30:35] = scores[29]                                  # exact ties
    scores[:5] = torch.tensor([0.9, 0.8, 0.7, 0.0011, 0.0012])  # near min_score: dropped after decay
    for thr in (0.3, 0.8):
        dets, keep = soft_nms(boxes, scores, thr)
        ref_dets, ref_keep = _soft_nms_reference(boxes, scores, thr)
        assert torch.equal(keep, ref_keep)
        assert torch.equal(dets, ref_dets)
    assert keep.numel() < n  # some were dropped (exercises the swap-with-last compaction)


def test_batched_soft_nms_is_class_aware_and_postprocess_applies_it():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9.5], [0, 0, 10, 9.5], [20, 20, 30, 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1, 1, 2, 1])
    keep, s = batched_soft_nms(boxes, scores, labels, iou_threshold=0.8)
    assert keep.tolist() == [0, 2, 3, 1]                                  # box 2 (other class) untouched
    assert s[:3].tolist() == pytest.approx([0.9, 0.7, 0.6]) and s[3] == pytest.approx(0.8 * 0.05, rel=1e-5)
    logits = torch.logit(torch.tensor([[[0.9, 0.01], [0.8, 0.01]]]))
    bx = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.19]]])

    class Cfg:
        method, iou_threshold, sigma, max_per_image = "linear", 0.8, 0.5, 3

    hw = torch.tensor([[100, 100]])
    plain = postprocess((logits, bx), hw, hw, topk=4)[0]
    assert len(plain) == 4 and plain.scores.tolist() == pytest.approx([0.9, 0.8, 0.01, 0.01], rel=1e-5)
    # IoU 0.95: class 0's second box decays to 0.8 * 0.05; class 1's second to 0.01 * 0.05 < min_score (dropped)
    det = postprocess((logits, bx), hw, hw, topk=4, soft_nms=Cfg)[0]
    assert det.scores.tolist() == pytest.approx([0.9, 0.04, 0.01], rel=1e-4) and det.labels.tolist() == [0, 0, 1]
    Cfg.max_per_image = 2
    assert len(postprocess((logits, bx), hw, hw, topk=4, soft_nms=Cfg)[0]) == 2


# --------------------------------------------------------------------------- converters (key maps only)
def test_mmdet3_key_maps():
    from codetr.convert.mmdet3 import co_dino_query_head_key, convert_mmdet3_co_dino, convert_mmdet3_dino, \
        dino_key_mmdet3

    assert dino_key_mmdet3("decoder.ref_point_head.layers.1.bias") == "decoder.ref_point_head.layers.1.bias"
    assert dino_key_mmdet3("dn_query_generator.label_embedding.weight") == "denoising.label_embedding.weight"
    assert dino_key_mmdet3("memory_trans_fc.weight") == "enc_output.weight"
    assert dino_key_mmdet3("bbox_head.reg_branches.2.4.bias") == "box_heads.2.layers.2.bias"
    assert co_dino_query_head_key("transformer.decoder.ref_point_head.2.weight") == \
        "decoder.ref_point_head.layers.1.weight"
    assert co_dino_query_head_key("transformer.query_embed.weight") == "query_embedding.weight"
    assert co_dino_query_head_key("label_embedding.weight") == "denoising.label_embedding.weight"
    assert co_dino_query_head_key("transformer.level_embeds") == "level_embed"
    z = torch.zeros(1)
    sd = {"query_head.transformer.aux_pos_trans.0.weight": z, "query_head.transformer.aux_pos_trans_norm.1.bias": z,
          "rpn_head.rpn_conv.weight": z, "roi_head.0.bbox_head.fc_cls.weight": z, "bbox_head.0.atss_cls.weight": z,
          "query_head.downsample.1.weight": z, "neck.convs.0.conv.weight": z, "backbone.conv1.weight": z}
    out, rep = convert_mmdet3_co_dino(sd, ["atss", "faster_rcnn"])
    assert set(out) == {"collaborative.query_encoder.pos_trans.1.weight",      # official 0 = R-CNN = ours 1
                        "collaborative.query_encoder.pos_norm.0.bias",
                        "collaborative.heads.1.rpn_head.rpn_conv.weight",
                        "collaborative.heads.1.roi_head.bbox_head.fc_cls.weight",
                        "collaborative.heads.0.atss_cls.weight", "collaborative.adapter.downsample.1.weight",
                        "neck.convs.0.conv.weight", "backbone.conv1.weight"}
    with pytest.raises(ValueError, match="no codetr counterpart"):
        convert_mmdet3_co_dino(sd, [])
    out, rep = convert_mmdet3_co_dino(sd, [], allow_unmatched=True)
    assert "rpn_head.rpn_conv.weight" in rep.unmatched and "backbone.conv1.weight" in out
    with pytest.raises(ValueError, match="no codetr counterpart"):
        convert_mmdet3_dino({"bbox_head.something": z})


def test_encoder_checkpointing_gives_identical_outputs_and_grads():
    """``encoder_checkpoint_layers`` (official with_cp) changes memory use only, not numbers."""
    from codetr.variants.layers import DeformableEncoderLayer, run_encoder
    from codetr.core.interfaces import EncoderInputs

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(DeformableEncoderLayer(32, 4, 2, 2, 64, 0.0) for _ in range(2))
    shapes = [(6, 5), (3, 3)]
    s = sum(h * w for h, w in shapes)
    feats = torch.randn(2, s, 32, requires_grad=True)
    inputs = EncoderInputs(feats=feats, pos=torch.randn(2, s, 32), padding_mask=torch.zeros(2, s, dtype=torch.bool),
                           spatial_shapes=shapes, level_start=torch.tensor([0, 30]),
                           valid_ratios=torch.ones(2, 2, 2), strides=[8, 16])
    out_plain = run_encoder(layers, inputs)
    g_plain = torch.autograd.grad(out_plain.square().sum(), [feats, *layers.parameters()])
    out_cp = run_encoder(layers, inputs, checkpoint_layers=2)
    g_cp = torch.autograd.grad(out_cp.square().sum(), [feats, *layers.parameters()])
    torch.testing.assert_close(out_cp, out_plain, rtol=0, atol=0)
    for a, b in zip(g_cp, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
