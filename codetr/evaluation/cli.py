"""``codetr eval --predictions preds.json --annotations ann.json``: evaluate a COCO results file.

The main typer app wires :func:`eval_predictions_command` to its ``eval`` command; this module has no
typer app of its own.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from rich.console import Console

from codetr.evaluation import BACKENDS, CocoMetrics, EvaluationError, evaluate_predictions_file

__all__ = ["eval_predictions_command"]


def eval_predictions_command(
    predictions: Path,
    annotations: Path,
    backend: str = "faster",
    max_dets: int = 100,
    per_class: bool = True,
    out_json: Path | None = None,
    console: Console | None = None,
) -> CocoMetrics:
    """Evaluate ``predictions`` (COCO results list) against ``annotations`` and print rich tables.

    Input problems (missing/invalid files, unknown image or category ids, bad options) are printed as
    one red error and end the command with exit code 2 (``typer.Exit``); warnings (e.g. an empty
    predictions list) are printed in yellow. ``out_json`` receives the metrics (``CocoMetrics.as_dict``)
    plus the input paths.
    """
    err = console or Console(stderr=True)  # a console passed in (tests, embedding) gets the errors too
    console = console or Console()
    try:
        if backend not in BACKENDS:
            raise EvaluationError(f"--backend {backend!r} is not supported\n"
                                  f"  fix: use one of {', '.join(BACKENDS)}")
        if max_dets < 10:
            raise EvaluationError(f"--max-dets {max_dets} is too small\n  fix: use 100 (COCO) or the model's "
                                  "number of detections per image, e.g. 300")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = evaluate_predictions_file(predictions, annotations, backend=backend, max_dets=max_dets)
    except EvaluationError as e:
        err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
        import typer

        raise typer.Exit(code=2) from e
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    metrics.print(console=console, per_class=per_class)
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"predictions": str(predictions), "annotations": str(annotations), **metrics.as_dict()}
        tmp = out_json.with_name(out_json.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        tmp.replace(out_json)
        console.print(f"metrics written to {out_json}", highlight=False)
    return metrics
