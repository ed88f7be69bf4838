"""Loading recipes: YAML (+ ``base:`` one level deep) + ``--set`` overrides -> validated :class:`Recipe`.

Resolution order (what ``codetr config show`` prints):

1. read the YAML file; if it has ``base: other.yaml`` (relative to the file), read that file and
   deep-merge this file over it (mappings merge key by key; lists and scalars replace; a component
   section whose ``type`` changes replaces the base section wholesale). A base may not have a base.
2. apply ``--set a.b.c=value`` overrides in order (values parsed as YAML, so ``0.1`` is a float,
   ``[1, 2]`` a list, ``null`` None; list items are addressed as ``aux_heads.1`` or ``aux_heads[1]``).
3. validate against the schema (every problem reported at once, with its YAML path).
4. derive ``model.num_classes`` from the training data's categories when it is not given (and check
   it when it is) through a ``categories`` reader the caller supplies (``codetr.assembly.load_recipe``
   passes the data package's; ``core`` never reads data itself), then inject the shared dimensions into every component (single source of truth).
"""

from __future__ import annotations

import copy
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ValidationError

from codetr.core.config.errors import RecipeError, RecipeIssue, format_loc, issues_from_validation
from codetr.core.config.schema import DataSourceConfig, ModelConfig, Recipe
from codetr.core.registry import SHARED_FIELDS, ComponentError, ComponentGroup, registry

__all__ = ["CategoryReader", "parse_recipe", "parse_recipe_dict", "apply_overrides", "parse_override", "inject_shared",
           "recipe_to_yaml"]


# --------------------------------------------------------------------------- YAML + base
class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (YAML would silently keep the last)."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(None, None, f"duplicate key {key!r} (first at line {first.line + 1}, again at line "
                         f"{second.line + 1}); YAML would silently keep the last one: remove one of them", second)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate mapping keys (merge keys ``<<`` keep YAML's override rule)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: let SafeLoader report it
                continue
            if first is not None:
                raise DuplicateKeyError(key, first, key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text like ``yaml.safe_load`` but reject duplicate keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(str(path), [RecipeIssue("", "file not found (check the path; recipes live in recipes/)")])
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(str(path), [RecipeIssue("", f"invalid YAML at {where}{problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [RecipeIssue("", f"top level must be a mapping, got {type(data).__name__}")])
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict) and old.get("type", value.get("type")) == value.get("type", old.get("type")):
            out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_base(path: Path) -> dict[str, Any]:
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(str(path), [RecipeIssue("base", f"must be a file name, got {base!r}")])
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():
        raise RecipeError(str(path), [RecipeIssue("base", f"base recipe {base!r} not found (looked for {base_path})")])
    base_data = _read_yaml(base_path)
    if "base" in base_data:
        raise RecipeError(str(path), [RecipeIssue(
            "base", f"{base} itself has a base ({base_data['base']!r}); inheritance is one level deep: "
            "copy what you need from the grand-parent into the base")])
    return deep_merge(base_data, data)


# --------------------------------------------------------------------------- --set overrides
def _split_path(dotted: str) -> list[str | int]:
    parts: list[str | int] = []
    for raw in dotted.replace("[", ".").replace("]", "").split("."):
        if raw == "":
            raise ValueError(f"empty key in {dotted!r}")
        parts.append(int(raw) if raw.lstrip("-").isdigit() else raw)
    return parts


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``"a.b[1].c=value"`` -> (["a", "b", 1, "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = load_yaml(value) if value.strip() else ""
    except DuplicateKeyError as exc:
        raise ValueError(f"override {text!r}: {exc.problem}") from None
    except yaml.YAMLError:
        parsed = value
    return _split_path(key.strip()), parsed


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ValueError as exc:
            raise RecipeError(source, [RecipeIssue("", str(exc))]) from None
        node: Any = out
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or not -len(node) <= part < len(node):
                    size = len(node) if isinstance(node, list) else "not a list"
                    raise RecipeError(source, [RecipeIssue(format_loc(tuple(path[:i + 1])),
                                                           f"index {part} out of range ({size}) in --set {text}")])
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise RecipeError(source, [RecipeIssue(format_loc(tuple(path[:i])), f"is not a mapping; cannot set {text}")])
                if node.get(part) is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or not -len(node) <= last < len(node):
                raise RecipeError(source, [RecipeIssue(format_loc(tuple(path)), f"index out of range in --set {text}")])
        elif not isinstance(node, dict):
            raise RecipeError(source, [RecipeIssue(format_loc(tuple(path[:-1])), f"is not a mapping; cannot set {text}")])
        node[last] = value
    return out


# --------------------------------------------------------------------------- "did you mean" support
def _unwrap(annotation: Any, metadata: list[Any], raw: Any) -> type[BaseModel] | None:
    """The pydantic model class that validates ``raw`` for a field of this annotation, if any."""
    for meta in metadata:
        if isinstance(meta, ComponentGroup):
            if isinstance(raw, dict) and "type" in raw:
                try:
                    return registry.get(meta.group, str(raw["type"])).config
                except ComponentError:
                    return None
            return None
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        args = typing.get_args(annotation)
        return _unwrap(args[0], list(args[1:]), raw)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _unwrap(arg, [], raw)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _item_annotation(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) in (list, tuple):
                return typing.get_args(arg)[0]
    if origin in (list, tuple):
        return typing.get_args(annotation)[0]
    return None


def allowed_keys(loc: tuple[Any, ...], raw: dict[str, Any], root: type[BaseModel] = Recipe) -> list[str]:
    """Field names accepted at ``loc[:-1]`` of the recipe (for typo suggestions)."""
    cls: type[BaseModel] | None = root
    ann: Any = None
    node: Any = raw
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return []
        if isinstance(part, int):
            item = _item_annotation(ann)
            cls, ann = _unwrap(item, [], node), None
        else:
            if cls is None or part not in cls.model_fields:
                return []
            field = cls.model_fields[part]
            ann = field.annotation
            cls = _unwrap(field.annotation, list(field.metadata), node)
    return sorted(cls.model_fields) if cls is not None else []


# --------------------------------------------------------------------------- single source of truth
def _walk_inject(obj: Any, shared: dict[str, Any], path: str, issues: list[RecipeIssue]) -> Any:
    if isinstance(obj, list):
        return [_walk_inject(v, shared, f"{path}[{i}]", issues) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_walk_inject(v, shared, f"{path}[{i}]", issues) for i, v in enumerate(obj))
    if not isinstance(obj, BaseModel):
        return obj
    updates: dict[str, Any] = {}
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if name in shared and not isinstance(obj, ModelConfig):
            if value is None:
                updates[name] = shared[name]
            elif shared[name] is not None and value != shared[name]:
                issues.append(RecipeIssue(
                    f"{path}.{name}", f"{value!r} conflicts with model.{name} = {shared[name]!r}; "
                    f"set it once, in model.{name}"))
            continue
        new = _walk_inject(value, shared, f"{path}.{name}" if path else name, issues)
        if new is not value:
            updates[name] = new
    return obj.model_copy(update=updates) if updates else obj


def inject_shared(recipe: Recipe, source: str = "<recipe>") -> Recipe:
    """Copy the model-level shared dimensions into every component that declares them."""
    shared = {k: getattr(recipe.model, k) for k in SHARED_FIELDS}
    issues: list[RecipeIssue] = []
    model = _walk_inject(recipe.model, shared, "model", issues)
    if issues:
        raise RecipeError(source, issues)
    return recipe.model_copy(update={"model": model})


#: ``reader(source) -> category names in label order, or None (unknown)``; raises ``ValueError`` / ``OSError``
#: when the data cannot be read. Supplied by the layer that knows data sources
#: (:func:`codetr.assembly.load_recipe`); ``core`` itself never reads data.
CategoryReader = Callable[[DataSourceConfig], "list[str] | None"]


def _dataset_categories(recipe: Recipe, source: str, reader: CategoryReader) -> tuple[list[str] | None, str]:
    """Category names of the training (else validation) data, and where they came from.

    A dataset that is not on this machine is not an error while ``model.num_classes`` is given (the
    recipe can be shown and validated anywhere; training checks the data when it starts).
    """
    for split in ("train", "val"):
        src = getattr(recipe.data, split)
        if src is None:
            continue
        try:
            names = reader(src)
        except (ValueError, OSError) as exc:
            if recipe.model.num_classes is not None:
                continue
            raise RecipeError(source, [RecipeIssue(
                "model.num_classes", f"cannot be derived from data.{split}: {exc}; "
                f"fix the data path (--set data.{split}...=...) or set model.num_classes")]) from None
        if names is not None:
            return names, f"data.{split}"
    return None, ""


def _derive_num_classes(recipe: Recipe, source: str, categories: CategoryReader | None) -> Recipe:
    names, where = _dataset_categories(recipe, source, categories) if categories is not None else (None, "")
    given = recipe.model.num_classes
    if names is not None:
        if given is not None and given != len(names):
            raise RecipeError(source, [RecipeIssue(
                "model.num_classes", f"{given} conflicts with the {len(names)} categories of {where}; "
                "remove model.num_classes (it is derived from the data) or fix the dataset")])
        given = len(names)
    if given is None:
        raise RecipeError(source, [RecipeIssue(
            "model.num_classes", "cannot be derived: no data.train/data.val with categories; set model.num_classes")])
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"num_classes": given})})


# --------------------------------------------------------------------------- entry points
def parse_recipe_dict(data: dict[str, Any], source: str = "<recipe>", categories: CategoryReader | None = None) -> Recipe:
    """Validate an already-merged recipe mapping (see module docstring, steps 3-4).

    ``categories`` reads a data source's category names; without it ``model.num_classes`` must be given.
    """
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(source, issues_from_validation(err, lambda loc: allowed_keys(loc, data))) from None
    recipe = _derive_num_classes(recipe, source, categories)
    return inject_shared(recipe, source)


def parse_recipe(path: str | Path, overrides: list[str] | None = None,
                 categories: CategoryReader | None = None) -> Recipe:
    """Load, merge, override, validate and resolve a recipe file. Raises :class:`RecipeError`."""
    path = Path(path)
    data = _load_with_base(path)
    data = apply_overrides(data, list(overrides or []), source=str(path))
    return parse_recipe_dict(data, source=str(path), categories=categories)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what ``codetr config show`` prints)."""
    data = json.loads(recipe.model_dump_json())
    return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False, width=100)


class _RecipeDumper(yaml.SafeDumper):
    """Block style for mappings, flow style (``[1, 2]``) for lists of scalars."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)

