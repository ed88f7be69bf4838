"""``codetr config show|validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.syntax import Syntax

from codetr.cli.common import SET_HELP, console, err_console, load, user_errors

app = typer.Typer(help="Inspect and validate recipes.", no_args_is_help=True)


@app.command("show")
def show(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None,
    no_data: Annotated[bool, typer.Option("--no-data", help="Do not read the dataset (num_classes must then be set).")] = False,
) -> None:
    """Print the fully resolved recipe (after base + --set overrides + injected shared dimensions)."""
    from codetr.core.config import recipe_to_yaml

    with user_errors():
        resolved = load(recipe, set_, read_data=not no_data)
    console.print(Syntax(recipe_to_yaml(resolved), "yaml", theme="ansi_dark", background_color="default",
                         word_wrap=True))


@app.command("validate")
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="One or more recipe files.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None,
    no_data: Annotated[bool, typer.Option("--no-data", help="Do not read datasets (num_classes must be set or derivable).")] = False,
) -> None:
    """Check recipes; list every error and exit non-zero if any recipe is invalid."""
    from codetr.core.config import RecipeError
    from codetr.core.registry import ComponentError

    failed = 0
    for path in recipes:
        try:
            load(path, set_, read_data=not no_data)
        except (RecipeError, ComponentError, ValueError) as exc:
            failed += 1
            err_console.print(f"[red]✗[/] {path}")
            for line in str(exc).splitlines():
                err_console.print(f"    {line}", highlight=False, soft_wrap=True)
        else:
            console.print(f"[green]✓[/] {path}")
    if failed:
        err_console.print(f"[bold red]{failed} of {len(recipes)} recipe(s) invalid[/]")
        raise typer.Exit(1)
