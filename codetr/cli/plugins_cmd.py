"""``codetr plugins list``."""

from __future__ import annotations

import typer
from rich.table import Table

from codetr.cli.common import console

app = typer.Typer(help="Components registered through entry points (built-in and third-party).", no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """Show every component with its entry-point group and the distribution that provides it."""
    from codetr.core.registry import registry

    table = Table(title="codetr components", show_lines=False)
    for col in ("group", "name", "package", "status"):
        table.add_column(col, no_wrap=True)
    table.add_column("summary", overflow="fold", ratio=1)
    rows = registry.listing()
    for row in rows:
        status = "[green]ok[/]" if row["status"] == "ok" else f"[red]{row['status']}[/]"
        table.add_row(row["group"], row["name"], row["distribution"], status, row["summary"])
    console.print(table)
    if not rows:
        console.print("[yellow]no components found: is codetr installed (pip install -e .)?[/]")
