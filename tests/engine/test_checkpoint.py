"""Atomic checkpoints, resume helpers, RNG capture and the shape-aware init_from report."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from codetr.engine import checkpoint as ck


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "iter_00000010.pt"
    ck.save_checkpoint(path, {"iteration": 10, "w": torch.arange(5)})
    good = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes hit the temp file ...
        raise OSError("disk full")                    # ... then the write dies

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(ck.CheckpointError, match="disk full.*intact"):  # a clear error naming the file
        ck.save_checkpoint(path, {"iteration": 20, "w": torch.arange(7)})
    monkeypatch.undo()
    assert path.read_bytes() == good                          # previous file intact
    assert sorted(os.listdir(path.parent)) == [path.name]     # no temp file left behind
    state = ck.load_checkpoint(path)
    assert state["iteration"] == 10 and torch.equal(state["w"], torch.arange(5))


def test_latest_and_prune(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    for it in (5, 100, 20):
        ck.save_checkpoint(d / ck.checkpoint_name(it), {"iteration": it})
    ck.save_checkpoint(d / "best.pt", {"iteration": 5})
    assert ck.latest_checkpoint(tmp_path / "run") == d / "iter_00000100.pt"
    assert ck.latest_checkpoint(d) == d / "iter_00000100.pt"
    assert ck.latest_checkpoint(tmp_path / "nothing") is None
    deleted = ck.prune_checkpoints(d, keep_last=2)
    assert [p.name for p in deleted] == ["iter_00000005.pt"]
    assert sorted(p.name for p in d.iterdir()) == ["best.pt", "iter_00000020.pt", "iter_00000100.pt"]


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    state = ck.capture_rng_state(torch.device("cpu"))
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    ck.save_checkpoint(tmp_path / "r.pt", {"rng": [state]})
    random.random(); np.random.rand(); torch.rand(9)
    ck.restore_rng_state(ck.load_checkpoint(tmp_path / "r.pt")["rng"][0])
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


class Evil:
    pass


def test_load_rejects_pickled_objects(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ck.CheckpointError, match="weights_only"):
        ck.load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.pt")


class Src(nn.Module):
    def __init__(self, num_classes: int, extra: bool = False):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.class_embed = nn.Linear(8, num_classes)
        self.bbox_embed = nn.Linear(8, 4)
        if extra:
            self.fed_loss_weight = nn.Parameter(torch.ones(3))
        else:
            self.new_head = nn.Linear(8, 2)


def test_init_from_report_missing_unexpected_reshaped(tmp_path):
    src = Src(91, extra=True)
    ck.save_checkpoint(tmp_path / "coco.pt", {"model": src.state_dict(), "iteration": 5})
    dst = Src(7)
    fresh_cls = dst.class_embed.weight.detach().clone()
    console = Console(record=True, width=200)
    report = ck.init_from(dst, tmp_path / "coco.pt", console=console)
    assert sorted(report.loaded) == ["backbone.bias", "backbone.weight", "bbox_embed.bias", "bbox_embed.weight"]
    assert sorted(report.missing) == ["new_head.bias", "new_head.weight"]
    assert report.unexpected == ["fed_loss_weight"]
    assert sorted(k for k, _, _ in report.skipped_shape) == ["class_embed.bias", "class_embed.weight"]
    assert dict((k, (a, b)) for k, a, b in report.skipped_shape)["class_embed.weight"] == ((91, 8), (7, 8))
    assert torch.equal(dst.backbone.weight, src.backbone.weight)
    assert torch.equal(dst.class_embed.weight, fresh_cls)  # reshaped tensors keep their fresh init
    text = console.export_text()
    for word in ("loaded", "missing", "unexpected", "reshaped / skipped", "fed_loss_weight", "[91, 8]→[7, 8]"):
        assert word in text


def test_init_from_raw_and_ddp_prefixed_state_dicts(tmp_path):
    src = Src(7)
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "raw.pt")
    dst = Src(7)
    report = ck.init_from(dst, tmp_path / "raw.pt", quiet=True)
    assert not report.missing and not report.unexpected and not report.skipped_shape
    torch.save({"state_dict": src.state_dict(), "meta": {"epoch": 3}}, tmp_path / "mm.pt")
    assert len(ck.init_from(Src(7), tmp_path / "mm.pt", quiet=True).loaded) == len(src.state_dict())


def test_init_from_wrong_file_fails_loudly(tmp_path):
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ck.CheckpointError, match="no tensor matched"):
        ck.init_from(Src(7), tmp_path / "other.pt", quiet=True)
