"""The real detector through the real engine: overfitting, exact resume, batch-size-invariant evaluation."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from codetr.assembly import load_recipe
from codetr.data.synth import make_synthetic
from codetr.engine.checkpoint import extract_state_dict, load_checkpoint
from codetr.engine.trainer import Trainer

TINY = "recipes/tests/tiny.yaml"


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("few")
    make_synthetic(root, 8, seed=3)
    return root


def _recipe(root, *extra):
    return load_recipe(TINY, [
        f"data.train.coco.ann_file={root}/annotations.json", f"data.train.coco.images_dir={root}/images",
        f"data.val.coco.ann_file={root}/annotations.json", f"data.val.coco.images_dir={root}/images", *extra])


def _trainer(recipe, out, **kw):
    return Trainer(recipe, output_dir=out, console=Console(quiet=True), progress=False, **kw)


@pytest.mark.slow
def test_overfits_a_handful_of_images(few_images, tmp_path):
    """A tiny Deformable-DETR++ from scratch memorises 8 synthetic images (AP50 well above chance)."""
    recipe = _recipe(few_images, "schedule.iterations=150", "schedule.milestones=[135]")
    result = _trainer(recipe, tmp_path / "run").fit()
    ev = result["last_eval"]
    assert ev["AP50"] > 0.6, ev
    assert ev["AP"] > 0.3, ev


def test_resume_is_exact(few_images, tmp_path):
    """N steps + resume + N steps == 2N uninterrupted steps (bit-identical weights, CPU, seeded)."""
    n = 3
    full = _recipe(few_images, f"schedule.iterations={2 * n}", "schedule.milestones=[4]", "eval.period=0",
                   "runtime.checkpoint_period=3", "runtime.keep_last=10")
    _trainer(full, tmp_path / "a").fit()
    straight = extract_state_dict(load_checkpoint(tmp_path / "a" / "checkpoints" / "model_final.pt"))

    # resume the same recipe from the checkpoint the straight run wrote at iteration n
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("*.pt"))
    at_n = [p for p in ckpts if load_checkpoint(p).get("iteration") == n]
    assert at_n, [p.name for p in ckpts]
    _trainer(full, tmp_path / "b", resume=at_n[0]).fit()
    resumed = extract_state_dict(load_checkpoint(tmp_path / "b" / "checkpoints" / "model_final.pt"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_evaluation_does_not_depend_on_batch_size(few_images, tmp_path):
    """Padding masks everywhere: test batch 1 and 4 give the same COCO stats."""
    recipe = _recipe(few_images, "schedule.iterations=30", "schedule.milestones=[25]")
    t = _trainer(recipe, tmp_path / "run")
    t.fit()
    weights = tmp_path / "run" / "checkpoints" / "model_final.pt"
    stats = []
    for bs in (1, 4):
        r = _recipe(few_images, f"data.val.batch_size={bs}", "schedule.iterations=30", "schedule.milestones=[25]")
        ev = _trainer(r, tmp_path / f"eval{bs}", weights=weights, train=False).evaluate()
        stats.append(ev.stats)
    assert stats[0] == pytest.approx(stats[1], abs=1e-6)
