"""The training state a checkpoint holds, and how a run resumes from it.

* :func:`build_state` gathers the full state (collective): model, optimizer, scheduler, scaler,
  epoch / batch-in-epoch / iteration, every rank's data-stream position and RNG streams, the recipe and
  its hash, the last / best evaluation, step-health counters, class names and the training layout (see
  :mod:`codetr.engine.checkpoint` for the format). :func:`final_state` is the weights-only
  ``model_final.pt``.
* :func:`restore` (``--resume``) puts it back. The RNG streams and the data position are restored lazily,
  by the loop, through :class:`PendingResume`; when the layout (world size, batches per epoch,
  accumulation) changed they cannot be, and the run is re-seeded instead.
* :func:`resolve_resume` decides which checkpoint ``--resume`` means; :func:`load_eval_weights` is the
  weights-only load of ``codetr eval --checkpoint``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from rich.console import Console
from torch import nn

from codetr.engine import distributed as du
from codetr.engine.ema import ModelEMA
from codetr.engine.checkpoint import (
    CheckpointError,
    base_state,
    capture_rng_state,
    extract_state_dict,
    latest_readable_checkpoint,
    load_checkpoint,
    load_weights,
)

if TYPE_CHECKING:  # pragma: no cover
    from codetr.core.config.schema import Recipe
    from codetr.engine.trainer import Trainer

__all__ = ["PendingResume", "recipe_yaml", "data_state", "layout", "classes", "build_state", "final_state",
           "restore", "resolve_resume", "load_eval_weights"]


class PendingResume:
    """Parts of a resumed state that the training loop applies when it starts (or that replace its seeding)."""

    def __init__(self) -> None:
        self.rng: Mapping[str, Any] | None = None
        """This rank's saved RNG streams; restored at the start of the loop's first epoch, then ``None``.
        While set, the trainer does not re-seed the training RNGs."""
        self.data_state: Any = None
        """This rank's saved ``loader.state_dict()`` when resuming mid-epoch; consumed by the next epoch start."""
        self.reseed: int | None = None
        """The training seed to use instead of ``runtime.seed + rank`` when the layout changed (streams lost)."""


def recipe_yaml(recipe: "Recipe") -> str:
    """The resolved recipe as YAML (stored in checkpoints and ``recipe.yaml``; its hash identifies the run)."""
    try:
        from codetr.core.config import recipe_to_yaml

        return recipe_to_yaml(recipe)
    except Exception:  # noqa: BLE001 - a hand-built recipe (tests) may not serialise fully
        import yaml

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = json.loads(recipe.model_dump_json(warnings=False, fallback=str))
        return yaml.safe_dump(data, sort_keys=False)


def data_state(loader: Any) -> Any:
    """``loader.state_dict()`` (the data-stream position) when the loader has one, else ``None``."""
    sd = getattr(loader, "state_dict", None)
    return sd() if callable(sd) else None


def layout(world_size: int, batches_per_epoch: int, accumulate: int) -> dict[str, int]:
    """What the data position depends on; a resumed run with another layout restarts at an epoch start."""
    return {"world_size": world_size, "batches_per_epoch": batches_per_epoch, "accumulate_steps": accumulate}


def classes(*loaders: Any) -> dict[str, list] | None:
    """Class names and category ids of the data (stored in checkpoints for ``codetr predict``): those of
    the first loader whose ``info.categories`` is not empty."""
    for loader in loaders:
        info = getattr(loader, "info", None)
        cats = getattr(info, "categories", None)
        if cats:
            cats = [dict(c) if isinstance(c, Mapping) else {"id": c.id, "name": c.name} for c in cats]
            return {"names": [str(c["name"]) for c in cats], "category_ids": [int(c["id"]) for c in cats]}
    return None


def _layout_of(t: "Trainer") -> dict[str, int]:
    return layout(t.world_size, t.batches_per_epoch, t.accumulate)


def build_state(t: "Trainer") -> dict[str, Any] | None:
    """Collective (call on every rank); returns the full state on the main rank, ``None`` elsewhere."""
    rngs = du.all_gather_object(capture_rng_state(t.device))
    datas = du.all_gather_object(data_state(t.train_loader))
    if not t.is_main:
        return None
    return base_state(
        model=t.model.state_dict(),
        optimizer=t.optimizer.state_dict(),
        scheduler=t.scheduler.state_dict(),
        scaler=t.scaler.state_dict() if t.scaler.is_enabled() else None,
        epoch=t.epoch,
        batch_in_epoch=t.batch_in_epoch,
        iteration=t.iteration,
        total_iterations=t.total_iters,
        data={"train": datas},
        rng=rngs,
        world_size=t.world_size,
        recipe=t.recipe_yaml,
        recipe_sha256=t.recipe_hash,
        metrics=t.last_eval,
        best=t.best,
        counters={"bad_steps": t.health.bad_steps_total, "amp_overflows": t.health.amp_overflows},
        classes=classes(t.train_loader, t.val_loader),
        layout=_layout_of(t),
        ema_state=t.ema.state_dict() if t.ema is not None else None,
    )


def final_state(t: "Trainer") -> dict[str, Any]:
    """``model_final.pt``: weights, recipe, iteration, last evaluation and classes (no training state)."""
    extra = {}
    if t.ema is not None:  # the EMA weights are the ones evaluated: they are the model; the online ones kept too
        extra = {"online_model": t.model.state_dict(), "ema_updates": t.ema.updates}
    model = t.ema.module if t.ema is not None else t.model
    return base_state(model=model.state_dict(), recipe=t.recipe_yaml, recipe_sha256=t.recipe_hash,
                      iteration=t.iteration, metrics=t.last_eval, classes=classes(t.train_loader, t.val_loader),
                      **extra)


def restore(t: "Trainer", path: Path) -> None:
    """Restore the training state of checkpoint ``path`` into ``t`` (built for training, not yet trained):
    model, optimizer, scheduler, scaler, position, best / last evaluation, step-health counters, and
    ``t.pending`` (RNG streams and data position, or a re-seed when the layout changed)."""
    state = load_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "scheduler", "iteration", "epoch") if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a training checkpoint (missing {', '.join(missing)}): it holds weights only.\n"
            "  fix: to fine-tune from it set model.init_from (weights only); --resume continues a run")
    try:
        t.model.load_state_dict(state["model"])
    except RuntimeError as exc:  # size mismatch / missing / unexpected keys: another model
        raise CheckpointError(_other_model_message(path, state, t, exc)) from None
    try:
        t.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: the optimizer state does not fit this model/recipe ({exc}).\n"
            "  fix: --resume needs the same model and optim.param_groups; to start a new training from these "
            "weights use model.init_from") from None
    if t.ema is not None:
        if state.get("ema_state") is not None:
            t.ema.load_state_dict(state["ema_state"])
        else:
            t.ema = ModelEMA(t.model, t.ema.decay, t.ema.warmup)
            t.say("[yellow]warning:[/] the checkpoint has no EMA state (model.ema was off): the EMA starts "
                  "from the resumed weights")
    t.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and t.scaler.is_enabled():
        t.scaler.load_state_dict(state["scaler"])
    t.iteration = int(state["iteration"])
    t.epoch = int(state["epoch"])
    t.batch_in_epoch = int(state.get("batch_in_epoch", 0))
    t.best = state.get("best")
    t.last_eval = state.get("metrics")
    counters = state.get("counters") or {}
    t.health.bad_steps_total = int(counters.get("bad_steps", 0))
    t.health.amp_overflows = int(counters.get("amp_overflows", 0))
    if state.get("recipe_sha256") not in (None, t.recipe_hash):
        t.say("[yellow]warning:[/] the recipe differs from the one the checkpoint was trained with; "
              "the optimizer, schedule position and data position are restored anyway "
              "(diff: codetr config show vs the 'recipe' entry of the checkpoint)")
    current = _layout_of(t)
    saved = state.get("layout") or current
    if t.batch_in_epoch >= int(saved.get("batches_per_epoch", t.batches_per_epoch)):
        t.epoch, t.batch_in_epoch = t.epoch + 1, 0  # saved at the end of an epoch
    rngs = state.get("rng") or []
    datas = ((state.get("data") or {}).get("train")) or []
    if saved == current and len(rngs) == t.world_size:
        t.pending.rng = rngs[t.rank]
        if datas and t.batch_in_epoch:
            t.pending.data_state = datas[t.rank]
    else:
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v)
        skip = (f"; the rest of epoch {t.epoch} is skipped (resumed at the start of epoch {t.epoch + 1})"
                if t.batch_in_epoch else "")
        t.say(f"[yellow]warning:[/] the training layout changed since the checkpoint ({changed}): RNG streams "
              f"are re-seeded, so the run is no longer bit-reproducible{skip}. The iteration counter and the "
              "LR schedule continue unchanged")
        if t.batch_in_epoch:
            t.epoch, t.batch_in_epoch = t.epoch + 1, 0
        t.pending.reseed = t.recipe.runtime.seed + t.rank + 1_000_003 * t.iteration
    t.say(f"[green]resumed[/] from {path}: iteration {t.iteration}/{t.total_iters}, epoch {t.epoch}, "
          f"batch {t.batch_in_epoch}/{t.batches_per_epoch} of the epoch, lr {t.lr():.3g}")
    t.log.write({"type": "resume", "iteration": t.iteration, "epoch": t.epoch, "from": str(path)})


def resolve_resume(resume: str | os.PathLike[str] | None, output_dir: Path, *, is_main: bool,
                   say: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from, decided on rank 0 and shared, so every rank resumes the same one.

    ``None`` -> ``None``; ``"auto"`` -> the newest checkpoint of ``output_dir`` (``None`` when there is
    none); a path -> that path, which must be visible on every rank (collective in both latter cases).
    """
    if resume is None:
        return None
    if str(resume) == "auto":
        found, skipped = latest_readable_checkpoint(output_dir) if is_main else (None, [])
        found = du.broadcast_object(None if found is None else str(found))
        for bad in skipped:
            say(f"[yellow]warning:[/] --resume auto: {bad} is unreadable (cut short by a crash or a full disk?); "
                f"{'falling back to an older checkpoint' if found else 'no older one left'} (the file is kept)")
        if found is None:
            say(f"[dim]--resume auto: no checkpoint in {output_dir / 'checkpoints'}, starting a fresh run[/]")
            return None
        path = Path(found)
    else:
        path = Path(resume)
    visible = du.all_gather_object(path.is_file())
    if not all(visible):
        if not visible[0]:
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        missing = [r for r, ok in enumerate(visible) if not ok]
        raise FileNotFoundError(f"--resume {path}: the checkpoint is not visible on rank(s) {missing}; the output "
                                "directory must be on a filesystem shared by all nodes")
    return path


def load_eval_weights(model: nn.Module, path: str | os.PathLike[str], *, console: Console, is_main: bool,
                      say: Callable[[str], None]) -> None:
    """Weights-only, shape-aware load of ``path`` into ``model``; a partial match prints the report table
    and a warning, no matching tensor at all raises :class:`CheckpointError`."""
    obj = load_checkpoint(path)
    report = load_weights(model, extract_state_dict(obj), source=str(path))
    if report.missing or report.unexpected or report.skipped_shape or not report.loaded:
        if is_main:
            console.print(report.table())
        if not report.loaded:
            raise CheckpointError(f"{path}: no tensor matches this model (wrong recipe for this checkpoint?)")
        say("[yellow]warning:[/] the checkpoint does not fully match the model (see the table above)")
    else:
        say(f"[green]loaded[/] {len(report.loaded)} tensors from {path}")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _other_model_message(path: Path, state: dict[str, Any], t: "Trainer", exc: RuntimeError) -> str:
    """Which ``model.*`` recipe fields differ between the checkpoint's run and this one, and what to do."""
    import yaml

    lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln or "Missing key" in ln
             or "Unexpected key" in ln]
    detail = ""
    try:
        saved = _flat((yaml.safe_load(state.get("recipe") or "") or {}).get("model") or {}, "model")
        now = _flat((yaml.safe_load(t.recipe_yaml) or {}).get("model") or {}, "model")
        diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)]
        if diff:
            detail = ("\n  the recipes differ in " + "; ".join(diff[:8])
                      + (f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""))
    except yaml.YAMLError:
        pass
    first = f"\n  first mismatch: {lines[0][:200]}" if lines else ""
    return (f"--resume {path}: the checkpoint holds a different model than this recipe builds{detail}{first}\n"
            "  fix: --resume continues the same run (same recipe); to start a new training from these weights "
            f"set model.init_from: {path} (shape-aware: tensors that do not fit are skipped and reported)")
