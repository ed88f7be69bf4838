"""Rich tables shared by the data reports (``codetr data convert`` and ``codetr data inspect``).

Owns the two-column ``item | value`` summary table both reports print; ``rich`` is imported on use, so
importing this module stays light (converter worker processes never render anything).
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["key_value_table"]


def key_value_table(title: str, rows: Iterable[tuple[str, Any]]) -> Any:
    """A header-less ``rich.table.Table`` titled ``title`` with one ``name | str(value)`` row per pair
    (names bold, values right-aligned)."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("item", style="bold")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, str(value))
    return table
