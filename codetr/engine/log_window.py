"""What a training run reports: ``metrics.jsonl`` records, the per-rank logging window and the progress display.

* :class:`MetricsLog` appends one JSON object per line to ``<output_dir>/metrics.jsonl`` (main rank only),
  each prefixed with ``time``; record types: ``start``, ``train``, ``eval``, ``resume``, ``warning``,
  ``preempted``.
* :class:`Window` sums finite values per key over the current logging window on one rank;
  :func:`window_means` reduces it over all ranks (collective).
* :class:`LoopProgress` drives one training loop's display: a rich progress bar on an interactive main
  rank, and every ``log_period`` iterations a ``train`` record (plus a plain console line when no bar is
  shown, e.g. Slurm / CI log files).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from codetr.data.format import atomic_write_bytes
from codetr.engine import distributed as du

__all__ = ["MetricsLog", "Window", "window_means", "fmt_time", "make_progress", "LoopProgress"]


def fmt_time(seconds: float) -> str:
    """``H:MM:SS`` of a non-negative duration (negative values print as ``0:00:00``)."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class MetricsLog:
    """Appends JSON records to ``path`` (``metrics.jsonl``); a no-op unless ``enabled`` (the main rank)."""

    def __init__(self, path: str | os.PathLike[str], enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """One line ``{"time": <unix s, 3 decimals>, **record}``; non-JSON numbers are written as floats."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


    def drop_after(self, iteration: int) -> int:
        """Remove the records of iterations after ``iteration`` (a resumed run replays them, so every
        iteration keeps one row); atomic rewrite. Returns how many records were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                it = json.loads(line).get("iteration")
            except (json.JSONDecodeError, AttributeError):  # a line cut by a kill: the replay rewrites it
                dropped += 1
                continue
            if isinstance(it, int) and it > iteration:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            atomic_write_bytes(self.path, "".join(k + "\n" for k in kept).encode("utf-8"))
        return dropped


class Window:
    """Sums over the current logging window (per rank)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, key: str, value: float) -> None:
        if math.isfinite(value):
            self.sums[key] += value
            self.counts[key] += 1

    def local(self) -> dict[str, tuple[float, int]]:
        return {k: (self.sums[k], self.counts[k]) for k in self.sums}


def window_means(window: Window) -> dict[str, float]:
    """Per-key means of ``window`` over every rank (collective: call on every rank), then reset it."""
    parts = du.all_gather_object(window.local())
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for p in parts:
        for k, (s, c) in p.items():
            sums[k] += s
            counts[k] += c
    means = {k: sums[k] / counts[k] for k in sums if counts[k]}
    window.reset()
    return means


def make_progress(console: Console, enabled: bool):
    """The rich progress bar of a training loop (``description``, bar, M/N, ``stats`` field, times)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console, transient=False,
                    disable=not enabled, refresh_per_second=4)


class LoopProgress:
    """Progress reporting of one training loop (a context manager around the rich progress bar).

    Args:
        console: the run's console (quiet on non-main ranks).
        log: where ``train`` records go.
        is_main: this is rank 0.
        show_bar: a live bar (interactive terminal); otherwise one console line per ``log_period``.
        total_iters: schedule length in optimizer steps.
        start_iteration: the iteration the loop (re)starts at; speed and ETA count from here.
        log_period: ``runtime.log_period``; a ``train`` record every that many iterations and at the end.
    """

    def __init__(self, console: Console, log: MetricsLog, *, is_main: bool, show_bar: bool, total_iters: int,
                 start_iteration: int, log_period: int):
        self.console = console
        self.log = log
        self.is_main = is_main
        self.show_bar = show_bar
        self.total_iters = total_iters
        self.log_period = log_period
        self.it_start = start_iteration
        self.t_start = time.perf_counter()
        self._bar = make_progress(console, is_main and show_bar)
        self._task: Any = None

    def __enter__(self) -> "LoopProgress":
        self.t_start = time.perf_counter()
        self._bar.__enter__()
        self._task = self._bar.add_task("train", total=self.total_iters, completed=self.it_start, stats="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def start_epoch(self, epoch: int) -> None:
        self._bar.update(self._task, description=f"epoch {epoch}")

    def step(self, window: Window, *, iteration: int, epoch: int, lr: float, bad_steps: int,
             extra: Callable[[], dict[str, Any]]) -> None:
        """After optimizer step ``iteration``: update the bar; when a log period ends (or the schedule does),
        reduce ``window`` over the ranks (collective) and write the ``train`` record ``{type, iteration,
        epoch, lr, <window means>, bad_steps, eta_s, **extra()}``."""
        elapsed = time.perf_counter() - self.t_start
        speed = (iteration - self.it_start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_iters - iteration) / speed if speed > 0 else float("nan")
        if self.is_main and self.show_bar:
            loss_now = window.sums["loss"] / max(window.counts["loss"], 1)
            self._bar.update(self._task, completed=iteration,
                             stats=f"loss {loss_now:.4f}  lr {lr:.2e}  {speed:.2f} it/s")
        if iteration % self.log_period == 0 or iteration == self.total_iters:
            eta_s = eta if math.isfinite(eta) else -1.0
            means = window_means(window)
            record: dict[str, Any] = {"type": "train", "iteration": iteration, "epoch": epoch, "lr": lr}
            record.update({k: round(v, 6) for k, v in sorted(means.items())})
            record.update({"bad_steps": bad_steps, "eta_s": round(eta_s, 1)})
            record.update(extra())
            self.log.write(record)
            if self.is_main and not self.show_bar:
                self.console.print(f"it {iteration}/{self.total_iters}  loss {means.get('loss', float('nan')):.4f}  "
                                   f"lr {lr:.2e}  {speed:.2f} it/s  eta "
                                   f"{fmt_time(eta) if math.isfinite(eta) else '?'}", highlight=False)
