"""``codetr train | eval | predict``.

Plain functions plus :func:`register`, which adds them to the main typer app as commands ``train``,
``eval`` and ``predict``. Multi-GPU: run the same command under ``torchrun --nproc-per-node N`` (or
``srun``); every rank executes it, only rank 0 prints and writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from codetr.cli.common import SET_HELP, console, fail, load, user_errors
from codetr.engine.preemption import PREEMPTED_EXIT_CODE

__all__ = ["train", "eval_cmd", "predict", "register", "PREEMPTED_EXIT_CODE"]

#: exit code of a run stopped by SIGTERM after checkpointing (BSD EX_TEMPFAIL: "try again"), so a scheduler
#: can tell it from a finished run (0) and from an error (1)


def _engine_errors():
    """user_errors() plus the engine's own expected failures (divergence, DDP/launch problems)."""
    import contextlib

    from codetr.engine.distributed import DistributedError
    from codetr.engine.errors import TrainingError

    @contextlib.contextmanager
    def ctx():
        import os

        with user_errors():
            try:
                yield
            except (TrainingError, DistributedError) as exc:
                if os.environ.get("CODETR_DEBUG"):
                    raise
                raise fail(str(exc)) from None

    return ctx()


def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="Continue a run: a checkpoint path, or 'auto' (newest checkpoint of the output dir, "
        "else a fresh start). Restores model, optimizer, schedule, scaler, RNG and data position. "
        "To fine-tune from other weights use model.init_from instead.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Default: runtime.output_dir or runs/<recipe name>.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start over in an output dir that holds an earlier run: its files are moved to "
        "<output-dir>/replaced-<time>/ (nothing is deleted). Without it such a run is refused.")] = False,
) -> None:
    """Train a recipe (single process, or every rank under torchrun / srun).

    Exit codes: 0 finished (or already finished), 1 error, 75 (EX_TEMPFAIL) stopped by SIGTERM after a
    checkpoint: rerun with ``--resume auto`` to continue.
    """
    from codetr.engine.distributed import destroy_distributed
    from codetr.engine.trainer import Trainer

    try:
        with _engine_errors():
            resolved = load(recipe, set_)
            result = Trainer(resolved, resume=resume, output_dir=output_dir, overwrite=overwrite).fit()
        if result.get("status") == "preempted":
            console.print(f"stopped by SIGTERM at iteration {result.get('iteration')} after a checkpoint; exit code "
                          f"{PREEMPTED_EXIT_CODE}: continue with --resume auto")
            raise typer.Exit(PREEMPTED_EXIT_CODE)
    finally:
        destroy_distributed()


def eval_cmd(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML file (model-based evaluation on data.val).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Weights to evaluate (codetr checkpoint or state dict).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", help="COCO results json to score (no model needed).")] = None,
    annotations: Annotated[Optional[Path], typer.Option("--annotations", help="COCO annotation json for --predictions.")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="faster (default) or pycocotools.")] = None,
    max_dets: Annotated[Optional[int], typer.Option("--max-dets", help="maxDets for AP/AR (default: eval.max_dets, 100).")] = None,
) -> None:
    """Evaluate a checkpoint on the recipe's validation data, or a predictions file against annotations."""
    if predictions is not None or annotations is not None:
        if predictions is None or annotations is None:
            raise fail("--predictions and --annotations go together")
        if recipe is not None or checkpoint is not None:
            raise fail("give either a recipe (+ --checkpoint) or --predictions/--annotations, not both")
        from codetr.evaluation.cli import eval_predictions_command

        eval_predictions_command(predictions, annotations, backend=backend or "faster", max_dets=max_dets or 100,
                                 console=console)
        return
    if recipe is None:
        raise fail("missing recipe: `codetr eval RECIPE --checkpoint W.pt` or `codetr eval --predictions P.json "
                   "--annotations A.json`")
    from codetr.engine.distributed import destroy_distributed
    from codetr.engine.trainer import Trainer

    overrides = list(set_ or [])
    if backend is not None:
        overrides.append(f"eval.backend={backend}")
    if max_dets is not None:
        overrides.append(f"eval.max_dets={max_dets}")
    try:
        with _engine_errors():
            resolved = load(recipe, overrides)
            if checkpoint is None:
                console.print("[yellow]warning:[/] no --checkpoint: evaluating the freshly initialised model "
                              "(model.init_from if set)")
            Trainer(resolved, train=False, weights=checkpoint).evaluate()
    finally:
        destroy_distributed()


def predict(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (model + evaluation transforms).")],
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Trained weights.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder (one JSON + one PNG per image).")] = Path("predictions"),
    score_threshold: Annotated[float, typer.Option("--score-threshold", help="Keep detections with score >= this.")] = 0.3,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace files in --out that an earlier codetr predict did not write.")] = False,
) -> None:
    """Detect objects in images; write JSON (xyxy pixels, scores, classes) and drawn PNGs.

    Never writes over an input, nor over a file in --out it did not write itself (unless --overwrite);
    unreadable inputs are skipped, listed at the end, and make the exit code 1.
    """
    from codetr.engine.predict import PredictError, predict_images

    with _engine_errors():
        resolved = load(recipe, set_, read_data=False) if _has_num_classes(recipe, set_) else load(recipe, set_)
        try:
            predict_images(resolved, checkpoint, images, out, score_threshold, console=console, overwrite=overwrite)
        except (PredictError, FileExistsError) as exc:
            raise fail(str(exc)) from None


def _has_num_classes(recipe: Path, overrides: list[str] | None) -> bool:
    """Avoid reading the dataset at inference time when the recipe states num_classes itself."""
    try:
        import yaml

        data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
        if any(o.split("=", 1)[0].strip() == "model.num_classes" for o in overrides or []):
            return True
        return isinstance(data, dict) and isinstance(data.get("model"), dict) and data["model"].get("num_classes") is not None
    except Exception:  # noqa: BLE001 - let load() report the real problem
        return False


def register(app: typer.Typer) -> None:
    """Add ``train``, ``eval`` and ``predict`` to the main app."""
    app.command("train")(train)
    app.command("eval")(eval_cmd)
    app.command("predict")(predict)
