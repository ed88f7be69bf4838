"""Checkpoints: atomic writes, full training state, ``--resume auto``, and weights-only ``init_from``.

A training checkpoint is a plain dict of tensors and primitive containers, so it loads with
``torch.load(weights_only=True)`` (no pickled code is ever executed)::

    format            "codetr-checkpoint"      format_version  1
    codetr_version    str                      torch_version   str
    model             state dict of the unwrapped detector
    optimizer         optimizer.state_dict()   scheduler   LambdaLR.state_dict()
    scaler            GradScaler.state_dict() or None
    epoch             epoch in progress (0-based)
    batch_in_epoch    batches of that epoch already consumed
    iteration         optimizer steps done
    data              {"train": loader.state_dict()} (or {"train": None})
    rng               one entry per rank: {"python": [...], "numpy": {...}, "torch": uint8 tensor, "cuda": ...}
    world_size        int
    recipe            resolved recipe as YAML text      recipe_sha256  hash of that text
    metrics           last evaluation (flat dict)        best        {"metric", "value", "iteration"} or None
    counters          {"bad_steps": ..., ...}

Files in ``<output_dir>/checkpoints/``: ``iter_00001234.pt`` (periodic and epoch-end, the newest
``keep_last`` kept), ``best.pt`` (highest ``eval.metric``) and ``model_final.pt`` (weights + recipe only).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

import codetr

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "periodic_checkpoints",
    "checkpoint_name",
    "prune_checkpoints",
    "capture_rng_state",
    "restore_rng_state",
    "extract_state_dict",
    "LoadReport",
    "load_weights",
    "init_from",
    "recipe_sha256",
]

FORMAT = "codetr-checkpoint"
FORMAT_VERSION = 1
_PERIODIC = re.compile(r"^iter_(\d+)\.pt$")


class CheckpointError(ValueError):
    """An unreadable or unsuitable checkpoint; the message says what to do."""


# --------------------------------------------------------------------------- atomic save / load
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write ``state`` atomically: temp file in the same directory, fsync, ``os.replace``.

    A crash (or exception) during the write leaves any previous file at ``path`` untouched and removes
    the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota, permissions, read-only filesystem
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CheckpointError(
            f"cannot write checkpoint {path}: {exc.strerror or exc} (disk full? quota? permissions?); nothing was "
            "replaced: the earlier checkpoints are intact.\n  fix: free space (or choose another --output-dir) and "
            "rerun with --resume auto") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` onto ``map_location`` (CPU by default: no GPU memory surge)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - we re-raise with context
        raise CheckpointError(
            f"{path}: cannot be loaded with torch.load(weights_only=True): {type(exc).__name__}: {exc}\n"
            "  fix: is it a complete, trusted PyTorch checkpoint? (files written by codetr always load this way)"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def checkpoint_name(iteration: int) -> str:
    return f"iter_{int(iteration):08d}.pt"


def periodic_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the periodic checkpoints in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _PERIODIC.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest periodic checkpoint of ``directory`` (or of ``directory/checkpoints``), for ``--resume auto``."""
    d = Path(directory)
    for cand in (d / "checkpoints", d):
        found = periodic_checkpoints(cand)
        if found:
            return found[-1][1]
    return None


def readable_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Cheap integrity check of a checkpoint file: a complete torch zip archive (its central directory sits
    at the end, so a file cut short by a crash or a full disk fails here without being unpickled)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def latest_readable_checkpoint(directory: str | os.PathLike[str]) -> tuple[Path | None, list[Path]]:
    """The newest periodic checkpoint that passes :func:`readable_checkpoint`, and the newer unreadable ones
    it skipped (newest first), for ``--resume auto``."""
    d = Path(directory)
    skipped: list[Path] = []
    for cand in (d / "checkpoints", d):
        found = periodic_checkpoints(cand)
        for _, path in reversed(found):
            if readable_checkpoint(path):
                return path, skipped
            skipped.append(path)
        if found:
            return None, skipped
    return None, skipped


def prune_checkpoints(directory: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` periodic checkpoints; returns the deleted paths."""
    found = periodic_checkpoints(directory)
    doomed = [p for _, p in found[:-keep_last]] if keep_last > 0 else [p for _, p in found]
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return doomed


def recipe_sha256(recipe_yaml: str) -> str:
    return hashlib.sha256(recipe_yaml.encode("utf-8")).hexdigest()


def base_state(**extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "codetr_version": codetr.__version__,
            "torch_version": str(torch.__version__), **extra}


# --------------------------------------------------------------------------- RNG
def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU (and the current CUDA device's) RNG states as tensors/primitives."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), int(nps["pos"]),
                         int(nps["has_gauss"]), float(nps["gauss"])))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8), device)


# --------------------------------------------------------------------------- weights-only loading
def extract_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a codetr checkpoint (``model``; the EMA weights of a periodic checkpoint of an
    EMA run, ``ema_state.module``, which are the ones that run evaluates), an mmdet/Detectron-style file
    (``state_dict`` / ``model``) or a raw state dict; the DDP ``module.`` prefix is stripped."""
    sd: Any = obj
    ema = obj.get("ema_state") if isinstance(obj, Mapping) else None
    if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping):
        obj = {"model": ema["module"]}
    for key in ("model", "state_dict", "model_state_dict", "ema"):
        if isinstance(obj.get(key) if isinstance(obj, Mapping) else None, Mapping):
            sd = obj[key]
            break
    if not isinstance(sd, Mapping):
        raise CheckpointError("no state dict found (expected a 'model' / 'state_dict' entry or a raw state dict)")
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


@dataclass
class LoadReport:
    """Outcome of a shape-aware weight load."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # in the model, not in the file (keep their init)
    unexpected: list[str] = field(default_factory=list)    # in the file, not in the model (ignored)
    skipped_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (key, file, model)

    @property
    def ok(self) -> bool:
        return bool(self.loaded)

    def table(self, max_rows: int = 12):
        from rich.table import Table

        t = Table(title=f"weights loaded from {self.source}", title_justify="left")
        t.add_column("status")
        t.add_column("#", justify="right")
        t.add_column("keys (first ones)", overflow="fold")

        def first(keys: list[str]) -> str:
            return ", ".join(keys[:max_rows]) + (f", … (+{len(keys) - max_rows})" if len(keys) > max_rows else "")

        t.add_row("[green]loaded[/]", str(len(self.loaded)), "" if not self.loaded else "(matching name and shape)")
        t.add_row("[yellow]missing[/] (kept init)", str(len(self.missing)), first(self.missing))
        t.add_row("[yellow]unexpected[/] (ignored)", str(len(self.unexpected)), first(self.unexpected))
        t.add_row("[magenta]reshaped / skipped[/]", str(len(self.skipped_shape)),
                  first([f"{k} {list(a)}→{list(b)}" for k, a, b in self.skipped_shape]))
        return t

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "loaded": len(self.loaded), "missing": list(self.missing),
                "unexpected": list(self.unexpected),
                "skipped_shape": [[k, list(a), list(b)] for k, a, b in self.skipped_shape]}


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>") -> LoadReport:
    """Copy every tensor whose name and shape match; report the rest. Never raises on a mismatch."""
    base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    own = base.state_dict()
    report = LoadReport(source=source)
    to_load: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            report.skipped_shape.append((k, tuple(v.shape), tuple(own[k].shape)))
        else:
            to_load[k] = v
            report.loaded.append(k)
    report.missing = [k for k in own if k not in state_dict]
    if to_load:
        base.load_state_dict(to_load, strict=False)
    return report


def init_from(model: nn.Module, path: str | os.PathLike[str], console=None, quiet: bool = False) -> LoadReport:
    """Weights-only initialisation (fine-tuning): shape-aware partial load + a printed load report.

    Accepts codetr checkpoints (key ``model``), ``state_dict``-style files and raw state dicts. Tensors
    whose shape differs (e.g. class heads of another dataset) keep the model's fresh initialisation
    and are listed as *reshaped / skipped*. Nothing about the optimizer, schedule or iteration is
    restored (use ``--resume`` for that). Raises when no tensor at all matches (wrong file).
    """
    path = Path(path)
    obj = load_checkpoint(path)
    sd = extract_state_dict(obj)
    report = load_weights(model, sd, source=str(path))
    if not quiet:
        from rich.console import Console

        (console or Console()).print(report.table())
    if not report.ok:
        raise CheckpointError(
            f"{path}: no tensor matched the model by name and shape ({len(report.unexpected)} unexpected, "
            f"{len(report.skipped_shape)} shape mismatches) — this is not a checkpoint of this architecture\n"
            "  fix: check model.init_from, or convert the checkpoint first")
    return report
