"""Recipes: typed schema, YAML parsing (base + --set), readable errors.

Users load recipes with :func:`codetr.assembly.load_recipe`, which also reads the data's categories;
this package is the data-free part that ``core`` owns.
"""

from codetr.core.config.errors import RecipeError, RecipeIssue
from codetr.core.config.loader import apply_overrides, parse_recipe, parse_recipe_dict, recipe_to_yaml
from codetr.core.config.schema import Recipe

__all__ = ["Recipe", "RecipeError", "RecipeIssue", "parse_recipe", "parse_recipe_dict", "apply_overrides", "recipe_to_yaml"]
