"""The Trainer with a fake detector on a tiny synthetic COCO set read by the real loader."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from codetr.engine.checkpoint import load_checkpoint
from codetr.engine.errors import TrainingError
from codetr.engine.trainer import Trainer

from .conftest import FakeDetector, console_text, fake_factory, make_recipe, quiet_console


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _records(path, kind=None):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if kind is None or r["type"] == kind]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_is_bit_exact(synth_data, tmp_path, accumulate):
    """N steps + resume + N steps == 2N uninterrupted steps (CPU, seeded), mid-epoch and at an epoch end."""
    # 12 train images, batch 2 -> 6 batches/epoch -> 6 (acc 1) or 3 (acc 2) iterations per epoch
    iters = 8 if accumulate == 1 else 5
    sections = dict(
        optim={"lr": 2e-3, "accumulate_steps": accumulate, "clip_grad_norm": 0.5,
               "param_groups": [{"pattern": "conv", "lr_mult": 0.5}]},
        schedule={"iterations": iters, "milestones": [iters - 2], "warmup_iters": 3},
        runtime={"checkpoint_period": 1, "keep_last": 20, "device": "cpu", "seed": 5},
    )
    full = Trainer(make_recipe(synth_data, tmp_path / "full", **sections), model_factory=fake_factory(),
                   console=quiet_console())
    full.fit()
    final = _weights(full)
    ckpts = tmp_path / "full" / "checkpoints"
    per_epoch = 6 // accumulate
    for stop in (per_epoch // 2 + 1, per_epoch):  # mid-epoch and exactly at the epoch boundary
        run = tmp_path / f"resumed_{stop}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(ckpts / f"iter_{stop:08d}.pt", run / "checkpoints")
        state = load_checkpoint(ckpts / f"iter_{stop:08d}.pt")
        assert state["iteration"] == stop and state["data"]["train"][0] is not None
        resumed = Trainer(make_recipe(synth_data, run, **sections), resume="auto", model_factory=fake_factory(),
                          console=quiet_console())
        assert resumed.iteration == stop
        resumed.fit()
        assert resumed.iteration == iters
        for k, v in final.items():
            assert torch.equal(resumed.model.state_dict()[k], v), f"{k} differs after resuming at {stop}"
        # optimizer moments and LR schedule continue too
        sa, sb = full.optimizer.state_dict(), resumed.optimizer.state_dict()
        for pid in sa["state"]:
            assert torch.equal(sa["state"][pid]["exp_avg_sq"], sb["state"][pid]["exp_avg_sq"])
        assert full.scheduler.state_dict()["last_epoch"] == resumed.scheduler.state_dict()["last_epoch"]


def test_checkpoint_contents_and_logging(synth_data, tmp_path):
    recipe = make_recipe(synth_data, tmp_path / "run", eval={"period": 3},
                         schedule={"iterations": 6}, runtime={"checkpoint_period": 2, "keep_last": 2, "log_period": 2})
    console = quiet_console()
    trainer = Trainer(recipe, model_factory=fake_factory(), console=console)
    result = trainer.fit()
    assert result["status"] == "finished" and result["iteration"] == 6
    ck = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["best.pt", "iter_00000004.pt", "iter_00000006.pt", "model_final.pt"]  # keep_last=2
    state = load_checkpoint(ck / "iter_00000006.pt")
    for key in ("model", "optimizer", "scheduler", "rng", "data", "recipe", "codetr_version", "epoch", "iteration"):
        assert key in state
    assert state["scaler"] is None and state["world_size"] == 1 and "name: fake" in state["recipe"]
    assert state["classes"]["names"][0] == "circle" and state["classes"]["category_ids"][:4] == [1, 2, 3, 5]
    assert state["best"]["metric"] == "AP"
    rows = _records(tmp_path / "run" / "metrics.jsonl")
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["iteration"] for r in train_rows] == [2, 4, 6]
    for key in ("loss", "loss_cls", "loss_bbox", "num_pos", "lr", "data_time", "step_time", "grad_norm"):
        assert key in train_rows[0]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["iteration"] for r in evals] == [3, 6] and "val/AP" in evals[0] and "val/AR100" in evals[0]
    text = console_text(console)
    assert "Average Precision" in text and "optimizer adamw" in text
    assert (tmp_path / "run" / "recipe.yaml").read_text().startswith("name: fake")


def test_nonfinite_loss_is_skipped_then_aborts(synth_data, tmp_path):
    model = FakeDetector()
    model.nan_calls = {2}  # one bad batch: skipped, training goes on
    console = quiet_console()
    recipe = make_recipe(synth_data, tmp_path / "a", schedule={"iterations": 4}, runtime={"max_bad_steps": 3})
    trainer = Trainer(recipe, model_factory=lambda cfg: model, console=console)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit()
    assert trainer.bad_steps_total == 1 and trainer.iteration == 4
    text = console_text(console)
    assert "non-finite loss at iteration 2" in text and "loss_bbox" in text and "images [" in text
    bad = _records(tmp_path / "a" / "bad_steps.jsonl")
    assert bad[0]["ranks"][0]["terms"] == ["loss_bbox"] and len(bad[0]["ranks"][0]["image_ids"]) == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    # every step non-finite: the weights never change and the run aborts with a diagnosis
    model2 = FakeDetector()
    model2.nan_calls = set(range(1, 100))
    recipe2 = make_recipe(synth_data, tmp_path / "b", schedule={"iterations": 10}, runtime={"max_bad_steps": 3})
    trainer2 = Trainer(recipe2, model_factory=lambda cfg: model2, console=quiet_console())
    init = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(TrainingError, match="3 consecutive steps with non-finite") as exc:
        trainer2.fit()
    assert "lower optim.lr" in str(exc.value) and "bad_steps.jsonl" in str(exc.value)
    assert all(torch.equal(init[k], v) for k, v in model2.state_dict().items())


def test_zero_losses_warn_with_a_diagnosis(synth_data, tmp_path):
    model = FakeDetector()
    model.zero = True
    console = quiet_console()
    recipe = make_recipe(synth_data, tmp_path / "z", val=False, schedule={"iterations": 5},
                         runtime={"no_positive_patience": 3})
    Trainer(recipe, model_factory=lambda cfg: model, console=console).fit()
    text = " ".join(console_text(console).split())
    assert "for 3 iterations every loss term is exactly zero" in text
    assert "class-id mapping" in text  # the batches do contain GT boxes
    assert text.count("exactly zero") == 1  # warned once per streak
    warnings = _records(tmp_path / "z" / "metrics.jsonl", "warning")
    assert len(warnings) == 1


def test_reference_batch_warning_and_eval_only(synth_data, tmp_path):
    console = quiet_console()
    recipe = make_recipe(synth_data, tmp_path / "r", schedule={"iterations": 2, "reference_batch_size": 16})
    Trainer(recipe, model_factory=fake_factory(), console=console)
    text = " ".join(console_text(console).split())
    assert "effective batch 2 differs from the recipe's reference batch 16" in text
    assert "optim.accumulate_steps=8" in text

    console = quiet_console()
    ev = Trainer(recipe, train=False, model_factory=fake_factory(), console=console)
    metrics = ev.evaluate()
    assert metrics.num_images == 6 and 0.0 <= metrics.AP <= 1.0
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_resume_of_finished_run_and_weights_only_file(synth_data, tmp_path):
    recipe = make_recipe(synth_data, tmp_path / "f", val=False, schedule={"iterations": 2})
    Trainer(recipe, model_factory=fake_factory(), console=quiet_console()).fit()
    console = quiet_console()
    again = Trainer(recipe, resume="auto", model_factory=fake_factory(), console=console)
    assert again.fit()["status"] == "already_finished"
    assert "model.init_from" in " ".join(console_text(console).split())
    from codetr.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="weights only"):
        Trainer(recipe, resume=tmp_path / "f" / "checkpoints" / "model_final.pt", model_factory=fake_factory(),
                console=quiet_console())


def test_unused_parameters_are_named(synth_data, tmp_path):
    console = quiet_console()
    recipe = make_recipe(synth_data, tmp_path / "u", val=False, schedule={"iterations": 1})
    Trainer(recipe, model_factory=fake_factory(unused=True), console=console).fit()
    text = " ".join(console_text(console).split())
    assert "unused.weight" in text and "DDP" in text


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])  # SIGUSR1: SLURM --signal=USR1@<s> before the limit
def test_stop_signal_saves_and_resume_auto_continues(synth_data, tmp_path, signame):
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    sig = getattr(signal, signame)
    previous = signal.getsignal(sig)
    sections = dict(val=False, schedule={"iterations": 5}, runtime={"seed": 9})
    full = Trainer(make_recipe(synth_data, tmp_path / "full", **sections), model_factory=fake_factory(),
                   console=quiet_console())
    full.fit()

    class Preempted(FakeDetector):
        def loss(self, batch):
            if self.calls == 2:  # the 3rd forward: the signal arrives mid-step
                os.kill(os.getpid(), sig)
            return super().loss(batch)

    recipe = make_recipe(synth_data, tmp_path / "pre", **sections)
    first = Trainer(recipe, model_factory=lambda cfg: Preempted(cfg.num_classes), console=quiet_console())
    assert first.fit()["status"] == "preempted"
    assert first.iteration == 3 and (tmp_path / "pre" / "checkpoints" / "iter_00000003.pt").is_file()
    assert signal.getsignal(sig) == previous  # handler restored after fit
    second = Trainer(recipe, resume="auto", model_factory=fake_factory(), console=quiet_console())
    assert second.fit()["status"] == "finished" and second.iteration == 5
    for k, v in full.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(synth_data, tmp_path, precision):
    recipe = make_recipe(synth_data, tmp_path / precision, val=False, schedule={"iterations": 3},
                         runtime={"precision": precision, "log_period": 1})
    trainer = Trainer(recipe, model_factory=fake_factory(), console=quiet_console())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    rows = _records(tmp_path / precision / "metrics.jsonl", "train")
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    state = load_checkpoint(tmp_path / precision / "checkpoints" / "iter_00000003.pt")
    assert (state["scaler"] is not None) == (precision == "fp16")
    if precision == "fp16":
        assert "loss_scale" in rows[0]


def test_epoch_schedule_eval_per_epoch_and_init_from(synth_data, tmp_path, monkeypatch):
    # weights of another "dataset" (different class count): the head is reshaped/skipped, the rest loads
    other = FakeDetector(num_classes=3)
    torch.save({"model": other.state_dict()}, tmp_path / "pretrained.pt")
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda flag, warn_only=False: calls.append((flag, warn_only)))
    console = quiet_console()
    recipe = make_recipe(synth_data, tmp_path / "ep", model={"init_from": str(tmp_path / "pretrained.pt")},
                         schedule={"epochs": 2, "milestones": [1], "iterations": None}, eval={"period": 1},
                         runtime={"deterministic": True, "log_period": 100})
    trainer = Trainer(recipe, model_factory=fake_factory(), console=console)
    assert calls == [(True, True)]
    assert torch.equal(trainer.model.conv.weight, other.conv.weight)
    text = " ".join(console_text(console).split())
    assert "reshaped / skipped" in text and "head.weight [7, 8]→[10, 8]" in text
    result = trainer.fit()
    assert result["iteration"] == 12 and trainer.epoch == 2
    evals = _records(tmp_path / "ep" / "metrics.jsonl", "eval")
    assert [(r["iteration"], r["epoch"]) for r in evals] == [(6, 0), (12, 1)]
    assert [r["iteration"] for r in _records(tmp_path / "ep" / "metrics.jsonl", "train")] == [12]  # + the final one
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)  # milestone at epoch 1
    names = sorted(p.name for p in (tmp_path / "ep" / "checkpoints").iterdir())
    assert "iter_00000006.pt" in names and "iter_00000012.pt" in names  # one per epoch end


def test_resume_with_another_layout_restarts_at_the_next_epoch(synth_data, tmp_path):
    recipe = make_recipe(synth_data, tmp_path / "l", val=False, schedule={"iterations": 3})
    Trainer(recipe, model_factory=fake_factory(), console=quiet_console()).fit()  # stops mid-epoch (3 of 6 batches)
    console = quiet_console()
    changed = make_recipe(synth_data, tmp_path / "l", val=False, schedule={"iterations": 6},
                          optim={"accumulate_steps": 2})
    trainer = Trainer(changed, resume="auto", model_factory=fake_factory(), console=console)
    text = " ".join(console_text(console).split())
    assert "accumulate_steps 1 -> 2" in text and "rest of epoch 0 is skipped" in text
    assert (trainer.iteration, trainer.epoch, trainer.batch_in_epoch) == (3, 1, 0)
    assert trainer.fit()["iteration"] == 6 and trainer.epoch == 2
