"""Shared CLI plumbing: one error path (red message, exit 1, no traceback) and recipe loading."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

SET_HELP = "Override a recipe value, e.g. --set optim.lr=1e-4 --set model.aux_heads.0.assigner.topk=5 (repeatable)."


def fail(message: str, code: int = 1) -> "typer.Exit":
    from rich.markup import escape

    # the message is plain text: brackets in it (``[x, y, width, height]``) must not be read as rich markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected user-facing errors into a red message and exit code 1 (set CODETR_DEBUG=1 for tracebacks)."""
    from codetr.core.config import RecipeError
    from codetr.core.registry import ComponentError

    try:
        yield
    except (RecipeError, ComponentError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("CODETR_DEBUG"):
            raise
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


def load(recipe: Path, overrides: list[str] | None, read_data: bool = True):
    from codetr.assembly import load_recipe

    return load_recipe(recipe, overrides or [], read_data=read_data)


def check_output_file(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """The rule for a command that writes one file: never one of its inputs; an existing file only with
    ``--overwrite``. Raises ``typer.Exit`` (a red message, exit code 1) before any work is done."""
    target = Path(out).resolve()
    for p in inputs:
        if Path(p).resolve() == target:
            raise fail(f"--out {out} is the input {p}; write the result to another file")
    if target.exists() and not overwrite:
        raise fail(f"--out {out} exists; choose another file or pass --overwrite to replace it")
    if target.is_dir():
        raise fail(f"--out {out} is a directory; give a file name")
