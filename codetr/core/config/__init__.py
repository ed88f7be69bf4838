"""Recipes: typed schema, YAML loading (base + --set), readable errors."""

from codetr.core.config.errors import RecipeError, RecipeIssue
from codetr.core.config.loader import apply_overrides, load_recipe, load_recipe_dict, recipe_to_yaml
from codetr.core.config.schema import Recipe

__all__ = ["Recipe", "RecipeError", "RecipeIssue", "load_recipe", "load_recipe_dict", "apply_overrides", "recipe_to_yaml"]
