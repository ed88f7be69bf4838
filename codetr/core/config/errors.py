"""Readable recipe errors: ``recipes/x.yaml: model.aux_heads[1].assigner.topk: must be >= 1, got 0``."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

__all__ = ["RecipeError", "RecipeIssue", "format_loc", "issues_from_validation"]


@dataclass(frozen=True)
class RecipeIssue:
    """One problem in a recipe: where (dotted YAML path), what, and the offending value."""

    path: str
    message: str

    def render(self, source: str) -> str:
        return f"{source}: {self.path}: {self.message}" if self.path else f"{source}: {self.message}"


class RecipeError(ValueError):
    """A recipe failed to load or validate. ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[RecipeIssue]):
        self.source = source
        self.issues = issues
        super().__init__("\n".join(i.render(source) for i in issues))


def format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "missing": "is required but missing",
    "literal_error": "must be one of {expected}",
}


def _num(value: Any) -> Any:
    """0.0 -> 0 in messages (bounds are written as ints in recipes)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def issues_from_validation(err: ValidationError, suggest: "callable | None" = None) -> list[RecipeIssue]:
    """Turn pydantic errors into :class:`RecipeIssue` s.

    ``suggest(loc) -> list[str]`` returns the allowed keys at ``loc[:-1]`` so an unknown key gets a
    "did you mean" hint.
    """
    issues = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        kind, ctx = e["type"], e.get("ctx") or {}
        if kind == "extra_forbidden":
            key = loc[-1] if loc else "?"
            allowed = suggest(loc) if suggest else []
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listing = f" (allowed: {', '.join(sorted(allowed))})" if allowed and not close else ""
            issues.append(RecipeIssue(format_loc(loc), f"unknown key {key!r}{hint}{listing}"))
            continue
        if kind in _MESSAGES:
            try:
                msg = _MESSAGES[kind].format(**{k: _num(v) for k, v in ctx.items()})
            except KeyError:
                msg = e["msg"]
        elif kind in ("value_error", "assertion_error"):
            msg = str(ctx.get("error", e["msg"])).removeprefix("Value error, ")
        else:
            msg = e["msg"][0].lower() + e["msg"][1:]
        if kind != "missing":
            msg += f", got {_short(e.get('input'))}"
        issues.append(RecipeIssue(format_loc(loc), msg))
    return issues
