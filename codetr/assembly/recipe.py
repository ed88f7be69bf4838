"""Loading a recipe the way every command does: parse + validate (``core.config``), with ``model.num_classes``
derived from the data's categories (``data``). This layer sits above both, so ``core`` never reads data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from codetr.core.config import parse_recipe, parse_recipe_dict
from codetr.core.config.data import DataSourceConfig
from codetr.core.config.schema import Recipe
from codetr.data.loader import source_categories

__all__ = ["load_recipe", "load_recipe_dict", "category_names"]


def category_names(source: DataSourceConfig) -> list[str] | None:
    """Category names of a data source in label order (reads only its index / annotation file), or None."""
    cats = source_categories(source)
    return None if cats is None else [c["name"] for c in cats]


def load_recipe(path: str | Path, overrides: list[str] | None = None, read_data: bool = True) -> Recipe:
    """Load, merge, override, validate and resolve a recipe file. Raises :class:`~codetr.core.config.RecipeError`.

    ``read_data=False`` skips reading the data's categories (``model.num_classes`` must then be given).
    """
    return parse_recipe(path, overrides, categories=category_names if read_data else None)


def load_recipe_dict(data: dict[str, Any], source: str = "<recipe>", read_data: bool = True) -> Recipe:
    """:func:`load_recipe` for an already-merged mapping."""
    return parse_recipe_dict(data, source, categories=category_names if read_data else None)
