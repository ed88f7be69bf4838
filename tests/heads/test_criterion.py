"""SetCriterion behaviour: names, normalisation, empty / crowd GT, gradients, fixed-target groups."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError

from codetr.core.interfaces import AuxTargets, DecoderOutputs
from codetr.core.structures import Batch, Target, normalize_boxes
from codetr.heads.criterion import SetCriterion, SetCriterionConfig, loss_name

C = 6
H, W = 240, 320


def _target(boxes: list[list[float]], labels: list[int], crowd: list[bool] | None = None) -> Target:
    n = len(labels)
    return Target(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                  labels=torch.tensor(labels, dtype=torch.int64),
                  iscrowd=torch.tensor(crowd or [False] * n, dtype=torch.bool))


def _batch(targets: list[Target]) -> Batch:
    b = len(targets)
    return Batch(images=torch.zeros(b, 3, H, W), masks=torch.zeros(b, H, W, dtype=torch.bool), targets=targets,
                 image_sizes=torch.tensor([[H, W]] * b), orig_sizes=torch.tensor([[H, W]] * b))


def _outputs(b: int, q: int = 12, layers: int = 3, seed: int = 0, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, b, q, C, generator=g)
    unact = torch.randn(layers, b, q, 4, generator=g) * 0.5 - torch.tensor([0.0, 0.0, 1.5, 1.5])
    logits.requires_grad_(requires_grad)
    unact.requires_grad_(requires_grad)
    boxes = unact.sigmoid()
    z = torch.zeros_like(boxes)
    return DecoderOutputs(logits=logits, boxes=boxes, hidden=z, references=z), logits, unact


def _extras(b: int, s: int = 40, channels: int = C, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"enc_logits": torch.randn(b, s, channels, generator=g).requires_grad_(),
            "enc_boxes": (torch.randn(b, s, 4, generator=g) * 0.5 - 1.0).sigmoid()}


TWO_IMAGES = [_target([[10, 20, 110, 200], [150, 30, 300, 120]], [1, 4]), _target([[50, 50, 90, 100]], [0])]


def test_config_defaults_and_validation():
    c = SetCriterionConfig()
    assert (c.cls_loss, c.cls_weight, c.bbox_weight, c.giou_weight) == ("focal", 2.0, 5.0, 2.0)
    assert (c.focal_alpha, c.focal_gamma, c.qfl_beta, c.enc_loss) == (0.25, 2.0, 2.0, "binary")
    assert c.matcher.cost_class == 2.0
    SetCriterionConfig.model_validate({"cls_loss": "qfl", "cls_weight": 1, "matcher": {"type": "hungarian"}})
    with pytest.raises(ValidationError):
        SetCriterionConfig(cls_los="qfl")
    with pytest.raises(ValidationError):
        SetCriterionConfig(enc_loss="agnostic")
    with pytest.raises(ValidationError):
        SetCriterionConfig(matcher={"type": "hungarian", "bogus": 1})


def test_loss_names():
    out, _, _ = _outputs(2, layers=3)
    losses = SetCriterion()(out, _batch(TWO_IMAGES), _extras(2))
    want = {loss_name(t, i, 3) for t in ("cls", "bbox", "iou") for i in range(3)}
    want |= {"enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"}
    assert set(losses) == want
    assert {"loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", "d1.loss_iou"} <= set(losses)
    assert loss_name("cls", 0, 6, suffix="_aux1") == "d0.loss_cls_aux1"
    losses = SetCriterion(SetCriterionConfig(enc_loss="none"))(out, _batch(TWO_IMAGES))
    assert not any(k.startswith("enc_") for k in losses) and len(losses) == 9


def test_missing_encoder_outputs_is_a_clear_error():
    out, _, _ = _outputs(2)
    with pytest.raises(ValueError, match="enc_loss: none"):
        SetCriterion()(out, _batch(TWO_IMAGES), {})


def test_perfect_predictions_have_zero_box_loss():
    batch = _batch(TWO_IMAGES)
    q = 10
    logits = torch.full((1, 2, q, C), -8.0)
    boxes = torch.full((1, 2, q, 4), 0.1)
    boxes[..., :2] = torch.linspace(0.1, 0.9, q)[:, None]
    for b, t in enumerate(batch.targets):
        nb = normalize_boxes(t.boxes, batch.image_sizes[b])
        boxes[0, b, 3:3 + len(t)] = nb
        logits[0, b, torch.arange(3, 3 + len(t)), t.labels] = 8.0
    out = DecoderOutputs(logits, boxes, boxes, boxes)
    res = SetCriterion(SetCriterionConfig(enc_loss="none")).compute(out, batch)
    assert float(res.losses["loss_bbox"]) < 1e-5 and float(res.losses["loss_iou"]) < 1e-5
    assert float(res.losses["loss_cls"]) < 1e-3
    assert res.matches["d0"][0].pred_idx.tolist() == [3, 4]


def test_normalisation_is_by_total_matches():
    """Duplicating the batch doubles both the sums and the normaliser: the losses do not change."""
    out, _, _ = _outputs(2, requires_grad=False)
    crit = SetCriterion(SetCriterionConfig(enc_loss="none"))
    single = crit(out, _batch(TWO_IMAGES))
    dup = DecoderOutputs(*(torch.cat([t, t], 1) for t in (out.logits, out.boxes, out.hidden, out.references)))
    double = crit(dup, _batch(TWO_IMAGES * 2))
    for k in single:
        torch.testing.assert_close(single[k], double[k])


def test_weights_scale_losses():
    out, _, _ = _outputs(2, requires_grad=False)
    base = SetCriterion(SetCriterionConfig(enc_loss="none", cls_weight=1.0, bbox_weight=1.0, giou_weight=1.0))(
        out, _batch(TWO_IMAGES))
    scaled = SetCriterion(SetCriterionConfig(enc_loss="none"))(out, _batch(TWO_IMAGES))
    for k, w in (("loss_cls", 2.0), ("loss_bbox", 5.0), ("loss_iou", 2.0)):
        torch.testing.assert_close(scaled[k], w * base[k])


@pytest.mark.parametrize("cls_loss", ["focal", "qfl"])
@pytest.mark.parametrize("enc_loss", ["binary", "class"])
def test_empty_gt_images_give_finite_losses_and_gradients(cls_loss, enc_loss):
    cfg = SetCriterionConfig(cls_loss=cls_loss, enc_loss=enc_loss)
    for targets in ([TWO_IMAGES[0], Target.empty()], [Target.empty(), Target.empty()]):
        out, logits, unact = _outputs(2)
        extras = _extras(2)
        losses = SetCriterion(cfg)(out, _batch(targets), extras)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values())
        total.backward()
        for t in (logits, unact, extras["enc_logits"]):
            assert t.grad is not None and torch.isfinite(t.grad).all()
        assert logits.grad.abs().sum() > 0  # background classification still trains
    assert float(losses["loss_bbox"].detach()) == 0.0 and float(losses["loss_iou"].detach()) == 0.0


def test_crowd_boxes_are_ignored():
    crowd = _target([[10, 20, 110, 200], [0, 0, 200, 200], [150, 30, 300, 120]], [1, 2, 4], [False, True, False])
    out, _, _ = _outputs(2, requires_grad=False)
    extras = _extras(2)
    crit = SetCriterion()
    with_crowd = crit(out, _batch([crowd, TWO_IMAGES[1]]), extras)
    without = crit(out, _batch(TWO_IMAGES), extras)
    for k in without:
        torch.testing.assert_close(with_crowd[k], without[k])


def test_binary_encoder_loss_with_single_channel_logits():
    out, _, _ = _outputs(2, requires_grad=False)
    extras = _extras(2, channels=1)
    losses = SetCriterion(SetCriterionConfig(enc_loss="binary"))(out, _batch(TWO_IMAGES), extras)
    assert torch.isfinite(losses["enc_loss_cls"])
    # binary = every GT relabelled 0: the 1-channel result equals channel 0 of a C-channel head whose
    # other channels contribute only background terms
    wide = {"enc_logits": torch.cat([extras["enc_logits"], torch.full((2, 40, C - 1), -30.0)], -1),
            "enc_boxes": extras["enc_boxes"]}
    wide_losses = SetCriterion(SetCriterionConfig(enc_loss="binary"))(out, _batch(TWO_IMAGES), wide)
    for k in ("enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"):
        torch.testing.assert_close(losses[k], wide_losses[k], rtol=1e-5, atol=1e-6)


def test_low_precision_inputs_give_float32_losses():
    out, _, _ = _outputs(2, requires_grad=False)
    half = DecoderOutputs(*(t.to(torch.bfloat16) for t in (out.logits, out.boxes, out.hidden, out.references)))
    losses = SetCriterion(SetCriterionConfig(enc_loss="none"))(half, _batch(TWO_IMAGES))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------- fixed-target (aux) groups
def _aux_targets(b: int = 2, p: int = 9, seed: int = 3) -> AuxTargets:
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((b, p), C)
    labels[:, :4] = torch.randint(0, C, (b, 4), generator=g)
    boxes = torch.cat([torch.rand(b, p, 2, generator=g) * 0.6 + 0.2, torch.rand(b, p, 2, generator=g) * 0.2 + 0.1], -1)
    box_w = (labels < C).float()
    return AuxTargets(labels=labels, boxes=boxes, label_weights=torch.ones(b, p), box_weights=box_w,
                      num_pos=float(box_w.sum()))


def test_aux_group_loss_names_weight_and_grads():
    out, logits, unact = _outputs(2, q=9, layers=3)
    t = _aux_targets()
    crit = SetCriterion(SetCriterionConfig(cls_loss="qfl", cls_weight=1.0))
    a = crit.aux_group_loss(out, t, "_aux0", image_sizes=torch.tensor([[H, W]] * 2))
    assert set(a) == {loss_name(k, i, 3, suffix="_aux0") for k in ("cls", "bbox", "iou") for i in range(3)}
    b = crit.aux_group_loss(out, t, "aux0")  # underscore added; normalised GIoU = pixel GIoU up to rounding
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    lam = SetCriterion(SetCriterionConfig(cls_loss="qfl", cls_weight=1.0)).aux_group_loss(
        out, t, "_aux0", weight=0.5)
    for k in a:
        torch.testing.assert_close(lam[k], 0.5 * b[k])
    sum(a.values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(unact.grad).all()


def test_aux_group_loss_official_weight_layout_and_zero_label_weights():
    out, _, _ = _outputs(2, q=9, layers=2, requires_grad=False)
    t = _aux_targets()
    crit = SetCriterion()
    ref = crit.aux_group_loss(out, t, "_aux1")
    t4 = AuxTargets(t.labels, t.boxes, t.label_weights, t.box_weights[..., None].expand(-1, -1, 4), t.num_pos)
    for k, v in crit.aux_group_loss(out, t4, "_aux1").items():
        torch.testing.assert_close(v, ref[k])
    # zero label weight on padding (use_zero_padding=True) removes exactly those rows' cls terms
    lw = (t.labels < C).float()
    tz = AuxTargets(t.labels, t.boxes, lw, t.box_weights, t.num_pos)
    z = crit.aux_group_loss(out, tz, "_aux1")
    assert float(z["loss_cls_aux1"]) < float(ref["loss_cls_aux1"])
    torch.testing.assert_close(z["loss_bbox_aux1"], ref["loss_bbox_aux1"])


def test_aux_group_without_positives_and_without_queries():
    out, logits, _ = _outputs(2, q=9, layers=2)
    t = _aux_targets()
    neg = AuxTargets(torch.full_like(t.labels, C), t.boxes, t.label_weights, torch.zeros_like(t.box_weights), 0.0)
    losses = SetCriterion().aux_group_loss(out, neg, "_aux0")
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_bbox_aux0"].detach()) == 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all()
    empty, _, _ = _outputs(2, q=0, layers=2)
    e = AuxTargets(torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, 4), torch.zeros(2, 0), torch.zeros(2, 0), 0.0)
    losses = SetCriterion().aux_group_loss(empty, e, "_aux0")
    assert len(losses) == 6 and all(float(v.detach()) == 0.0 for v in losses.values())


def test_fixed_target_loss_prefix_for_denoising():
    out, _, _ = _outputs(1, q=9, layers=2, requires_grad=False)
    losses = SetCriterion().fixed_target_loss(out, _aux_targets(b=1), prefix="dn_")
    assert set(losses) == {"dn_loss_cls", "dn_loss_bbox", "dn_loss_iou",
                           "d0.dn_loss_cls", "d0.dn_loss_bbox", "d0.dn_loss_iou"}


# ---------------------------------------------------------------------- distributed normalisation
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        out, _, _ = _outputs(1, requires_grad=False, seed=rank)
        targets = [TWO_IMAGES[0]] if rank == 0 else [Target.empty()]  # 2 GT on rank 0, none on rank 1
        crit = SetCriterion(SetCriterionConfig(enc_loss="none"))
        synced = crit(out, _batch(targets))
        queue.put((rank, {k: float(v) for k, v in synced.items()}))
    finally:
        dist.destroy_process_group()


def test_normalisers_are_averaged_over_ranks():
    """Rank 0 (2 matches) and rank 1 (0 matches): every normaliser is mean(2, 0) = 1, clamp >= 1."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), queue), nprocs=2, join=True, start_method="spawn")
    got = dict(queue.get(timeout=30) for _ in range(2))
    out, _, _ = _outputs(1, requires_grad=False, seed=0)
    crit = SetCriterion(SetCriterionConfig(enc_loss="none"))
    local = crit(out, _batch([TWO_IMAGES[0]]))  # single process: normaliser 2
    for k, v in local.items():
        assert got[0][k] == pytest.approx(2.0 * float(v), rel=1e-5)
