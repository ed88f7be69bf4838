"""The output directory of a training run: never write over an earlier run without being asked.

A fresh run (no ``--resume``) into a directory that already holds a run's files (``RUN_FILES``) is refused
with the three ways forward: ``--resume auto`` (continue it), ``--overwrite`` (start over: the earlier
files are *moved* to ``<output_dir>/replaced-<UTC time>/``, nothing is deleted) or another ``--output-dir``.
``--resume auto`` that finds no checkpoint but leftovers of a run that never checkpointed moves them aside
the same way, so ``metrics.jsonl`` never mixes two runs. Files that are not a run's (a user's notes, data)
are left where they are.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from codetr.engine import distributed as du
from codetr.engine.errors import TrainingError

__all__ = ["RUN_FILES", "earlier_run_files", "claim_output_dir", "ensure_output_dir"]

#: what a training run writes into its output directory (and so what marks an earlier run)
RUN_FILES = ("checkpoints", "metrics.jsonl", "bad_steps.jsonl", "recipe.yaml")


def earlier_run_files(output_dir: Path) -> list[Path]:
    """The ``RUN_FILES`` present in ``output_dir`` (an empty ``checkpoints/`` folder does not count)."""
    found = []
    for name in RUN_FILES:
        p = output_dir / name
        if p.is_dir() and any(p.iterdir()) or p.is_file():
            found.append(p)
    return found


def claim_output_dir(output_dir: Path, *, resume_auto: bool, overwrite: bool, is_main: bool,
                     say: Callable[[str], None]) -> Path | None:
    """Make ``output_dir`` safe for a fresh run; returns where earlier files were moved (or None).

    Raises:
        TrainingError: it holds an earlier run and neither ``overwrite`` nor ``resume_auto`` was given.
    """
    found = du.broadcast_object([str(p) for p in earlier_run_files(output_dir)] if is_main else None)
    if not found:
        return None
    names = ", ".join(Path(p).name for p in found)
    if not (overwrite or resume_auto):
        raise TrainingError(
            f"--output-dir {output_dir} already holds a training run ({names}); a fresh run would write over it. "
            "Continue it with --resume auto, start over with --overwrite (the earlier files are moved to "
            f"{output_dir}/replaced-<time>/, nothing is deleted), or choose another --output-dir.")
    dest = output_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if is_main:
        n = 0
        while dest.exists():  # two replacements within one second
            n += 1
            dest = output_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{n}"
        dest.mkdir(parents=True)
        for p in found:
            shutil.move(p, dest / Path(p).name)
    dest = Path(du.broadcast_object(str(dest) if is_main else None))
    du.barrier()
    say(f"[yellow]note:[/] the earlier run's files in {output_dir} ({names}) were moved to {dest}")
    return dest


def ensure_output_dir(output_dir: Path, *, is_main: bool) -> None:
    """Create ``output_dir`` (rank 0) before any work, or fail naming it as the output directory."""
    if not is_main:
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".codetr-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"--output-dir {output_dir}: cannot create or write the output directory "
                            f"({exc.strerror or exc}); choose a writable location with --output-dir "
                            "(or runtime.output_dir in the recipe)") from None
