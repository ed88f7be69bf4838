"""``model.ema``: the update rule, evaluation/export of the EMA weights, exact resume, no effect on training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from codetr.engine.checkpoint import extract_state_dict, load_checkpoint
from codetr.engine.ema import ModelEMA
from codetr.engine.trainer import Trainer

from .conftest import FakeDetector, make_recipe, quiet_console


def test_update_rule_with_warmup_and_integer_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(net, decay=0.9, warmup=4)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 5
    ema.update(net)
    d = 0.9 * (1 - math.exp(-1 / 4))
    assert ema.decay_at(1) == pytest.approx(d)
    want = d * start["0.weight"] + (1 - d) * net[0].weight
    assert torch.allclose(ema.module.state_dict()["0.weight"], want, atol=1e-7)
    assert int(ema.module.state_dict()["1.num_batches_tracked"]) == 5  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ModelEMA(net, 0.5, 0).decay_at(7) == 0.5
    with pytest.raises(ValueError, match="model.ema.decay"):
        ModelEMA(net, 1.0)


def _trainer(recipe, out, **kw):
    return Trainer(recipe, output_dir=out, model_factory=lambda cfg: FakeDetector(cfg.num_classes),
                   console=quiet_console(), progress=False, **kw)


def _weights(path):
    return extract_state_dict(load_checkpoint(path))


def test_ema_is_exported_and_does_not_change_training(synth_data, tmp_path):
    plain = make_recipe(synth_data, tmp_path / "a", schedule={"iterations": 4})
    with_ema = make_recipe(synth_data, tmp_path / "b", schedule={"iterations": 4},
                           model={"ema": {"decay": 0.8, "warmup": 0}})
    a = _trainer(plain, tmp_path / "a")
    a.fit()
    b = _trainer(with_ema, tmp_path / "b")
    b.fit()
    for k, v in a.model.state_dict().items():  # the online weights follow the same trajectory
        assert torch.equal(v, b.model.state_dict()[k]), k
    final = load_checkpoint(tmp_path / "b" / "checkpoints" / "model_final.pt")
    ema_sd = b.ema.module.state_dict()
    assert all(torch.equal(final["model"][k], ema_sd[k]) for k in ema_sd)  # model_final = the EMA weights
    assert all(torch.equal(final["online_model"][k], v) for k, v in b.model.state_dict().items())
    assert not torch.equal(final["model"]["head.weight"], final["online_model"]["head.weight"])
    assert b.ema.updates == 4
    # evaluation uses the EMA weights
    seen = []
    import codetr.engine.trainer as trainer_mod

    real = trainer_mod.evaluate_detector
    trainer_mod.evaluate_detector = lambda model, *a_, **k: (seen.append(model), real(model, *a_, **k))[1]
    try:
        b.evaluate()
    finally:
        trainer_mod.evaluate_detector = real
    assert seen[0] is b.ema.module


def test_resume_restores_the_ema_exactly(synth_data, tmp_path):
    n = 3
    recipe = make_recipe(synth_data, tmp_path / "full", schedule={"iterations": 2 * n},
                         runtime={"checkpoint_period": n, "keep_last": 10}, model={"ema": {"decay": 0.7, "warmup": 2}})
    _trainer(recipe, tmp_path / "full").fit()
    at_n = next(p for p in (tmp_path / "full" / "checkpoints").glob("iter_*.pt")
                if load_checkpoint(p)["iteration"] == n)
    straight = load_checkpoint(tmp_path / "full" / "checkpoints" / "model_final.pt")
    resumed_t = _trainer(recipe, tmp_path / "full2", resume=at_n)
    assert resumed_t.ema.updates == n
    resumed_t.fit()
    resumed = load_checkpoint(tmp_path / "full2" / "checkpoints" / "model_final.pt")
    for key in ("model", "online_model"):
        for k, v in straight[key].items():
            assert torch.equal(v, resumed[key][k]), (key, k)
    assert _weights(at_n).keys() == straight["model"].keys()  # a periodic checkpoint exports its EMA weights
