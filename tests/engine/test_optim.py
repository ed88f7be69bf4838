"""Parameter groups, LR schedule values, gradient accumulation and clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from codetr.core.config.schema import OptimConfig, ScheduleConfig
from codetr.engine.optim import (
    OptimizerStepper,
    accumulation_groups,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    lr_factor,
    total_iterations,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.encoder = nn.ModuleDict({"sampling_offsets": nn.Linear(4, 4), "attn": nn.Linear(4, 4)})
        self.reference_points = nn.Linear(4, 2)
        self.head = nn.Linear(4, 3)


def test_param_groups_first_match_wins_and_frozen_excluded():
    cfg = OptimConfig(lr=1e-4, weight_decay=0.05, param_groups=[
        {"pattern": "backbone", "lr_mult": 0.1},
        {"pattern": "sampling_offsets|reference_points", "lr_mult": 0.1, "weight_decay_mult": 0.0},
        {"pattern": "encoder", "lr_mult": 0.5},          # sampling_offsets matched the rule above first
        {"pattern": "does_not_exist", "lr_mult": 3.0},
    ])
    with pytest.warns(UserWarning, match="does_not_exist"):
        opt, table = build_optimizer(Net(), cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"backbone", "sampling_offsets|reference_points", "encoder", "default"}  # empty dropped
    assert by_name["backbone"]["lr"] == pytest.approx(1e-5) and by_name["backbone"]["weight_decay"] == pytest.approx(0.05)
    assert len(by_name["backbone"]["params"]) == 4  # conv w/b + bn w/b
    so = by_name["sampling_offsets|reference_points"]
    assert so["lr"] == pytest.approx(1e-5) and so["weight_decay"] == 0.0 and len(so["params"]) == 4
    assert by_name["encoder"]["lr"] == pytest.approx(5e-5) and len(by_name["encoder"]["params"]) == 2
    assert by_name["default"]["lr"] == pytest.approx(1e-4) and len(by_name["default"]["params"]) == 2  # head only
    n_trainable = sum(p.requires_grad for p in Net().parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable  # frozen excluded, nothing twice
    assert isinstance(opt, torch.optim.AdamW)

    from rich.console import Console

    c = Console(record=True, width=140)
    c.print(table)
    text = c.export_text()
    assert "does_not_exist" in text and "total trainable" in text and "#params" in text


def test_param_group_table_counts_and_sgd():
    groups = build_param_groups(Net(), OptimConfig(type="sgd", lr=0.02, param_groups=[{"pattern": "head"}]))
    assert [g.name for g in groups] == ["head", "default"]
    assert groups[0].num_tensors == 2 and groups[0].num_params == 4 * 3 + 3
    opt, _ = build_optimizer(Net(), OptimConfig(type="sgd", lr=0.02, momentum=0.8))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8


def test_invalid_regex_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid regular expression"):
        build_optimizer(Net(), OptimConfig(param_groups=[{"pattern": "back(bone"}]))


def test_warmup_and_step_schedule_values():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.1, "name": "default"}], lr=0.1)
    cfg = ScheduleConfig(epochs=12, milestones=[8, 11], gamma=0.1, warmup_iters=10, warmup_factor=0.001)
    sched = build_scheduler(opt, cfg, iters_per_epoch=5)
    assert total_iterations(cfg, 5) == 60
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 * 0.001)
    assert lrs[5] == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))
    assert lrs[10] == pytest.approx(0.1) and lrs[39] == pytest.approx(0.1)
    assert lrs[40] == pytest.approx(0.01)   # epoch 8 = iteration 40
    assert lrs[54] == pytest.approx(0.01) and lrs[55] == pytest.approx(0.001)  # epoch 11 = iteration 55
    assert lr_factor(0, [], 0.1, 0, 0.001) == 1.0


def test_iteration_schedule_and_exact_state_resume():
    cfg = ScheduleConfig(iterations=100, milestones=[30, 60], warmup_iters=20)
    def make():
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([{"params": [p], "lr": 2e-4, "name": "default"}])
        return opt, build_scheduler(opt, cfg, iters_per_epoch=7)
    opt_a, s_a = make()
    for _ in range(45):
        opt_a.step(); s_a.step()
    opt_b, s_b = make()
    s_b.load_state_dict(s_a.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())
    for _ in range(30):
        opt_a.step(); s_a.step(); opt_b.step(); s_b.step()
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
    assert opt_a.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.01)


def test_accumulation_groups():
    assert accumulation_groups(7, 1) == [1] * 7
    assert accumulation_groups(7, 2) == [2, 2, 2, 1]
    assert accumulation_groups(6, 3) == [3, 3]


def _grads_after(model, batches, clip=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stepper = OptimizerStepper(model, opt, clip_grad_norm=clip)
    for i, (x, y) in enumerate(batches):
        with stepper.sync_context(is_last=i == len(batches) - 1):
            loss = ((model(x) - y) ** 2).mean()
            stepper.backward(loss / len(batches))
    return [p.grad.clone() for p in model.parameters()], stepper


def test_accumulation_equivalence_batch4_vs_2x2():
    torch.manual_seed(0)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    base = nn.Linear(5, 3)
    m1, m2 = nn.Linear(5, 3), nn.Linear(5, 3)
    m1.load_state_dict(base.state_dict()); m2.load_state_dict(base.state_dict())
    full, _ = _grads_after(m1, [(x, y)])
    acc, _ = _grads_after(m2, [(x[:2], y[:2]), (x[2:], y[2:])])
    for a, b in zip(full, acc):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_step_clips_total_norm_and_skips_nonfinite():
    m = nn.Linear(4, 1)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    stepper = OptimizerStepper(m, opt, clip_grad_norm=0.5)
    (m(torch.full((2, 4), 10.0)).sum() * 100).backward()
    before = [p.detach().clone() for p in m.parameters()]
    out = stepper.step()
    assert out.stepped and out.grad_norm > 0.5
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(m.parameters(), before)))
    assert delta.item() == pytest.approx(0.5, rel=1e-4)  # lr 1 x clipped norm 0.5
    assert all(p.grad is None for p in m.parameters())
    # non-finite gradient: no update, grads cleared
    (m(torch.full((2, 4), float("inf"))).sum()).backward()
    snap = [p.detach().clone() for p in m.parameters()]
    out = stepper.step()
    assert not out.stepped and out.reason == "nonfinite_grad" and not math.isfinite(out.grad_norm)
    assert all(torch.equal(p, s) for p, s in zip(m.parameters(), snap))
    out = stepper.step(skip=True)
    assert not out.stepped and out.reason == "nonfinite_loss"
