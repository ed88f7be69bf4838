"""eval_predictions_command: tables, metrics json, clean errors."""

from __future__ import annotations

import json

import pytest
import typer
from rich.console import Console

from codetr.evaluation.cli import eval_predictions_command


@pytest.fixture
def console():
    return Console(record=True, width=140, force_terminal=False)


def test_cli_prints_tables_and_writes_json(gt, results, write_json, tmp_path, console):
    preds, ann = write_json("p.json", results), write_json("a.json", gt)
    out = tmp_path / "sub" / "metrics.json"
    m = eval_predictions_command(preds, ann, backend="pycocotools", max_dets=300, per_class=True,
                                 out_json=out, console=console)
    text = console.export_text()
    assert "AR300" in text and "maxDets=300" in text and "Per-class AP" in text and "train" in text
    data = json.loads(out.read_text())
    assert data["AP"] == m.AP and data["max_dets"] == 300 and data["backend"] == "pycocotools"
    assert data["annotations"] == str(ann) and "person" in data["per_class"]


def test_cli_without_per_class(gt, results, write_json, console):
    eval_predictions_command(write_json("p.json", results), write_json("a.json", gt), "faster", 100, False, None,
                             console=console)
    text = console.export_text()
    assert "AR100" in text and "Per-class" not in text


def test_cli_errors_exit_cleanly(gt, write_json, tmp_path, console):
    ann = write_json("a.json", gt)
    with pytest.raises(typer.Exit) as ei:
        eval_predictions_command(tmp_path / "missing.json", ann, "faster", 100, True, None, console=console)
    assert ei.value.exit_code == 2
    text = console.export_text()
    assert "error:" in text and "missing.json" in text and "fix:" in text
    with pytest.raises(typer.Exit):
        eval_predictions_command(ann, ann, "mmdet", 100, True, None, console=console)
    with pytest.raises(typer.Exit):
        eval_predictions_command(ann, ann, "faster", 5, True, None, console=console)


def test_cli_empty_predictions_warns(gt, write_json, console):
    m = eval_predictions_command(write_json("p.json", []), write_json("a.json", gt), "faster", 100, True, None,
                                 console=console)
    assert m.AP == 0 and "warning:" in console.export_text()
