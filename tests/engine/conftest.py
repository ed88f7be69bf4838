"""A tiny fake detector (the engine depends only on the Detector contract), toy recipe components and
a tiny synthetic COCO set read by the real ``codetr.data`` loader."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from torch import nn

from codetr.core.registry import Component, ComponentConfig, registry
from codetr.core.structures import Batch, Detections, xyxy_to_cxcywh

NUM_CLASSES = 6  # codetr.data.synth categories


class _ToyBackbone(ComponentConfig):
    type: Literal["engine_toy_backbone"] = "engine_toy_backbone"


class _ToyNeck(ComponentConfig):
    type: Literal["engine_toy_neck"] = "engine_toy_neck"


class _ToyVariant(ComponentConfig):
    type: Literal["engine_toy_variant"] = "engine_toy_variant"


_TOYS = {"backbones": _ToyBackbone, "necks": _ToyNeck, "variants": _ToyVariant}


@pytest.fixture(autouse=True)
def engine_toy_components():
    for group, cfg in _TOYS.items():
        registry.register(group, cfg.model_fields["type"].default, Component(config=cfg, build=lambda c, *a: c, summary="toy"))
    yield
    for group, cfg in _TOYS.items():
        registry.unregister(group, cfg.model_fields["type"].default)


class FakeDetector(nn.Module):
    """conv -> pool -> dropout -> linear; one (class, box) guess per image.

    ``loss`` returns ``loss_cls`` (CE vs the first GT label), ``loss_bbox`` (L1 vs its normalised cxcywh box),
    both zero-weighted on images without GT (every parameter still gets a gradient), plus ``num_pos``.
    Hooks for tests: ``nan_calls`` (loss() call numbers that return NaN), ``zero`` (all terms exactly 0),
    ``unused`` (adds a parameter that never gets a gradient).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.1, unused: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, num_classes + 4)
        self.backbone_scale = nn.Parameter(torch.ones(1))
        if unused:
            self.unused = nn.Linear(2, 2)
        self.nan_calls: set[int] = set()
        self.zero = False
        self.calls = 0

    def _features(self, batch: Batch) -> torch.Tensor:
        x = F.relu(self.conv(batch.images * self.backbone_scale))
        valid = (~batch.masks[:, ::2, ::2]).float()[:, None, : x.shape[2], : x.shape[3]]
        pooled = (x * valid).sum((2, 3)) / valid.sum((2, 3)).clamp(min=1)
        return self.head(self.drop(pooled))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.calls += 1
        out = self._features(batch)
        logits, box = out[:, : self.num_classes], out[:, self.num_classes:].sigmoid()
        cls_terms, box_terms, npos = [], [], 0
        for i, t in enumerate(batch.targets):
            if len(t) == 0:
                cls_terms.append(0.0 * logits[i].sum())
                box_terms.append(0.0 * box[i].sum())
                continue
            npos += 1
            h, w = batch.image_sizes[i].tolist()
            gt = xyxy_to_cxcywh(t.boxes[:1]) / torch.tensor([w, h, w, h], dtype=torch.float32)
            cls_terms.append(F.cross_entropy(logits[i : i + 1], t.labels[:1]))
            box_terms.append((box[i] - gt[0]).abs().sum())
        loss_cls = torch.stack(cls_terms).mean()
        loss_bbox = 5.0 * torch.stack(box_terms).mean()
        if self.zero:
            loss_cls, loss_bbox = loss_cls * 0.0, loss_bbox * 0.0
        if self.calls in self.nan_calls:
            loss_bbox = loss_bbox * float("nan")
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "num_pos": torch.tensor(float(npos))}

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[Detections]:
        out = self._features(batch)
        probs = out[:, : self.num_classes].softmax(-1)
        box = out[:, self.num_classes:].sigmoid()
        dets = []
        for i in range(len(batch)):
            oh, ow = batch.orig_sizes[i].tolist()
            cx, cy, bw, bh = (box[i] * torch.tensor([ow, oh, ow, oh])).tolist()
            xyxy = torch.tensor([[cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]]).repeat(3, 1)
            scores, labels = probs[i].topk(3)
            dets.append(Detections(xyxy, scores, labels))
        return dets


def fake_factory(**kw: Any):
    return lambda cfg: FakeDetector(cfg.num_classes, **kw)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict[str, Path]:
    from codetr.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("synth")
    out = {}
    for split, n, seed in (("train", 12, 0), ("val", 6, 1)):
        d = make_synthetic(root / split, n, seed, image_format="png", min_side=32, max_side=48, max_objects=3)
        out[split] = d
    return out


def recipe_dict(synth, out_dir: Path, *, batch_size: int = 2, val: bool = True, **sections: Any) -> dict:
    def src(split: str) -> dict:
        d = synth[split]
        return {"coco": {"ann_file": str(d.ann_file), "images_dir": str(d.images_dir)}, "batch_size": batch_size,
                "num_workers": 0, "transforms": {"kind": "none"}}

    r = {
        "name": "fake",
        "model": {"num_classes": NUM_CLASSES, "backbone": {"type": "engine_toy_backbone"},
                  "neck": {"type": "engine_toy_neck"}, "variant": {"type": "engine_toy_variant"}},
        "data": {"train": src("train"), **({"val": src("val")} if val else {})},
        "optim": {"lr": 1e-3, "clip_grad_norm": 1.0},
        "schedule": {"iterations": 6},
        "eval": {"period": 0, "per_class": False},
        "runtime": {"device": "cpu", "output_dir": str(out_dir), "log_period": 2, "seed": 3},
    }
    for k, v in sections.items():
        r[k] = {**r.get(k, {}), **v}
    return r


def make_recipe(synth, out_dir: Path, **kw: Any):
    from codetr.core.config.schema import Recipe

    return Recipe.model_validate(recipe_dict(synth, out_dir, **kw))


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=160, force_terminal=False)


def console_text(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.fixture
def app(monkeypatch):
    """A typer app with codetr's train / eval / predict commands on the fake detector."""
    from codetr.cli import train_cmd
    from codetr.assembly import load_recipe
    import codetr.engine.factories as factories_mod

    # the fake detector stands in for codetr.assembly.build_detector (the one default, used by train/eval/predict)
    monkeypatch.setattr(factories_mod, "default_model_factory", lambda cfg: FakeDetector(cfg.num_classes))
    # num_classes is given in the test recipes; do not depend on dataset category discovery here
    monkeypatch.setattr(train_cmd, "load", lambda r, s=None, read_data=True: load_recipe(r, s or [], read_data=False))
    a = typer.Typer()
    train_cmd.register(a)
    return a
