"""``codetr quickstart`` end to end on a tiny budget: synthetic data, training, COCO table, picture."""

from __future__ import annotations

import json

import torch
from PIL import Image
from typer.testing import CliRunner

from codetr.cli.main import app
from codetr.engine.visualize import display_threshold

runner = CliRunner()


def test_quickstart_runs_end_to_end_and_resumes(tmp_path):
    args = ["quickstart", "--data-dir", str(tmp_path / "synth"), "--output-dir", str(tmp_path / "run"),
            "--num-train", "8", "--num-val", "4",
            "--set", "schedule.iterations=2", "--set", "schedule.warmup_iters=1", "--set", "schedule.milestones=[1]",
            "--set", "data.train.num_workers=0", "--set", "data.val.num_workers=0"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    for needle in ("1/4 synthetic dataset", "2/4 training", "Average Precision", "quickstart done", "box AP ="):
        assert needle in res.output, needle
    metrics = json.loads((tmp_path / "run" / "quickstart_metrics.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0
    with Image.open(tmp_path / "run" / "predictions.png") as im:
        assert im.width > 2 * 200 and im.height > 4 * 150  # 4 rows of ground truth | predictions
    # a second call reuses the dataset and the finished run (no retraining)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "using the synthetic dataset" in res.output and "1/4 synthetic dataset" not in res.output


def test_display_threshold_shows_best_guesses_of_an_unconfident_model():
    assert display_threshold(torch.tensor([0.9, 0.8, 0.1]), 2) == 0.3
    assert abs(display_threshold(torch.tensor([0.2, 0.15, 0.05, 0.01]), 2) - 0.15) < 1e-6
    assert display_threshold(torch.tensor([0.001, 0.002]), 3) == 0.01
    assert display_threshold(torch.tensor([]), 3) == 0.3
