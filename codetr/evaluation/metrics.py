"""COCO metric definitions: the 12 standard stats, :class:`CocoMetrics` (values + rich tables) and the one
summariser both backends share (:func:`summarize_coco_arrays`), plus :class:`EvaluationError` and the option
checks every evaluation entry point uses. See :mod:`codetr.evaluation.coco` for the guarantees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["Backend", "BACKENDS", "EvaluationError", "CocoMetrics", "summarize_coco_arrays"]

Backend = Literal["faster", "pycocotools"]
BACKENDS: tuple[str, ...] = ("faster", "pycocotools")

# Order of the 12 standard COCO stats. "ARmax" is rendered as f"AR{max_dets}".
_STAT_FIELDS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "ARmax", "ARs", "ARm", "ARl")
# (kind, iou, area, which maxDets) for each stat, in the same order.
_STAT_SPECS: tuple[tuple[str, float | None, str, str], ...] = (
    ("AP", None, "all", "max"),
    ("AP", 0.50, "all", "max"),
    ("AP", 0.75, "all", "max"),
    ("AP", None, "small", "max"),
    ("AP", None, "medium", "max"),
    ("AP", None, "large", "max"),
    ("AR", None, "all", "1"),
    ("AR", None, "all", "10"),
    ("AR", None, "all", "max"),
    ("AR", None, "small", "max"),
    ("AR", None, "medium", "max"),
    ("AR", None, "large", "max"),
)


class EvaluationError(ValueError):
    """A problem with evaluation inputs; the message names the file/input, the problem and the fix."""


def _err(source: str, problem: str, fix: str) -> EvaluationError:
    return EvaluationError(f"{source}: {problem}\n  fix: {fix}")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def _check_max_dets(max_dets: int) -> int:
    if isinstance(max_dets, bool) or int(max_dets) != max_dets or max_dets < 10:
        raise ValueError(
            f"max_dets must be an integer >= 10 (maxDets is [1, 10, max_dets]); got {max_dets!r}"
        )
    return int(max_dets)


def _fmt(v: float) -> str:
    return "—" if v < 0 else f"{v:.3f}"


# --------------------------------------------------------------------------------------------------
# Metrics container
# --------------------------------------------------------------------------------------------------


@dataclass
class CocoMetrics:
    """The 12 standard COCO bbox stats (``-1`` = undefined, e.g. no GT in that area range).

    ``ARmax`` is the average recall at ``max_dets`` detections (rendered as ``AR100`` / ``AR300``).
    ``per_class`` maps category name -> ``{"category_id", "num_gt", "AP", "AP50", "AP75"}``.
    """

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    AR1: float
    AR10: float
    ARmax: float
    ARs: float
    ARm: float
    ARl: float
    max_dets: int = 100
    backend: str = "faster"
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0

    @property
    def stats(self) -> list[float]:
        """The 12 stats in the standard pycocotools order."""
        return [float(getattr(self, f)) for f in _STAT_FIELDS]

    @property
    def stat_names(self) -> list[str]:
        return [f"AR{self.max_dets}" if f == "ARmax" else f for f in _STAT_FIELDS]

    @classmethod
    def from_stats(cls, stats: Sequence[float], **kwargs: Any) -> "CocoMetrics":
        if len(stats) != 12:
            raise ValueError(f"expected 12 COCO stats, got {len(stats)}")
        return cls(**{f: float(v) for f, v in zip(_STAT_FIELDS, stats)}, **kwargs)

    def as_dict(self, prefix: str = "", per_class: bool = True) -> dict[str, Any]:
        """Flat, JSON-serialisable dict for JSONL logging (keys optionally prefixed, e.g. ``"val/"``)."""
        out: dict[str, Any] = {f"{prefix}{n}": v for n, v in zip(self.stat_names, self.stats)}
        out[f"{prefix}max_dets"] = self.max_dets
        out[f"{prefix}backend"] = self.backend
        out[f"{prefix}num_images"] = self.num_images
        out[f"{prefix}num_detections"] = self.num_detections
        if per_class:
            out[f"{prefix}per_class"] = {k: dict(v) for k, v in self.per_class.items()}
        return out

    def summary_lines(self) -> list[str]:
        """The classic 12-line COCO summary, with the maxDets actually used."""
        lines = []
        for (kind, iou, area, md), v in zip(_STAT_SPECS, self.stats):
            title = "Average Precision  (AP)" if kind == "AP" else "Average Recall     (AR)"
            iou_s = "0.50:0.95" if iou is None else f"{iou:0.2f}"
            m = self.max_dets if md == "max" else int(md)
            lines.append(f" {title} @[ IoU={iou_s:<9} | area={area:>6s} | maxDets={m:>3d} ] = {v:0.3f}")
        return lines

    def summary_table(self):
        from rich.table import Table

        t = Table(
            title=f"COCO bbox — backend={self.backend}, maxDets={self.max_dets}, images={self.num_images}",
            title_justify="left",
        )
        for col, just in (("Metric", "left"), ("Name", "left"), ("IoU", "center"), ("Area", "center"),
                          ("maxDets", "right"), ("Value", "right")):
            t.add_column(col, justify=just)
        for (kind, iou, area, md), name, v in zip(_STAT_SPECS, self.stat_names, self.stats):
            t.add_row(
                "Average Precision" if kind == "AP" else "Average Recall",
                name,
                "0.50:0.95" if iou is None else f"{iou:0.2f}",
                area,
                str(self.max_dets if md == "max" else int(md)),
                _fmt(v),
            )
        return t

    def per_class_table(self):
        from rich.table import Table

        t = Table(title=f"Per-class AP (maxDets={self.max_dets})", title_justify="left")
        for col, just in (("Category", "left"), ("id", "right"), ("GT", "right"), ("AP", "right"),
                          ("AP50", "right"), ("AP75", "right")):
            t.add_column(col, justify=just)
        for name, row in sorted(self.per_class.items(), key=lambda kv: kv[1]["category_id"]):
            t.add_row(name, str(int(row["category_id"])), str(int(row["num_gt"])),
                      _fmt(row["AP"]), _fmt(row["AP50"]), _fmt(row["AP75"]))
        return t

    def to_table(self, per_class: bool = True):
        """A rich renderable: the 12-line summary table, then (optionally) the per-class table."""
        from rich.console import Group

        parts = [self.summary_table()]
        if per_class and self.per_class:
            parts.append(self.per_class_table())
        return Group(*parts)

    def print(self, console=None, per_class: bool = True) -> None:
        from rich.console import Console

        (console or Console()).print(self.to_table(per_class=per_class))

    def __str__(self) -> str:
        return "\n".join(self.summary_lines())


# --------------------------------------------------------------------------------------------------
# Shared summariser (both backends)
# --------------------------------------------------------------------------------------------------


def _mean_valid(x: np.ndarray) -> float:
    v = x[x > -1]
    return float(np.mean(v)) if v.size else -1.0


def _iou_index(iou_thrs: np.ndarray, iou: float) -> np.ndarray:
    idx = np.where(np.isclose(np.asarray(iou_thrs, dtype=np.float64), iou))[0]
    if idx.size == 0:
        raise ValueError(f"IoU threshold {iou} is not among the evaluated thresholds {list(iou_thrs)}")
    return idx


def _max_dets_index(max_dets_list: Sequence[int], value: int) -> int:
    hits = [i for i, m in enumerate(max_dets_list) if int(m) == int(value)]
    if not hits:
        raise ValueError(f"maxDets={value} was not evaluated (evaluated: {list(max_dets_list)})")
    return hits[-1]


def summarize_coco_arrays(
    precision: np.ndarray,
    recall: np.ndarray,
    iou_thrs: Sequence[float],
    area_labels: Sequence[str],
    max_dets_list: Sequence[int],
    max_dets: int,
) -> np.ndarray:
    """The 12 COCO stats from accumulated arrays, with every "max" stat at ``max_dets``.

    ``precision`` is (T, R, K, A, M) and ``recall`` (T, K, A, M), as produced by ``accumulate()`` of
    either backend. Entries equal to -1 (no GT) are excluded from every mean; a stat with no valid
    entry is -1.
    """
    iou_thrs = np.asarray(iou_thrs, dtype=np.float64)
    labels = list(area_labels)
    stats = np.empty(12, dtype=np.float64)
    for i, (kind, iou, area, md) in enumerate(_STAT_SPECS):
        a = labels.index(area)
        m = _max_dets_index(max_dets_list, max_dets if md == "max" else int(md))
        if kind == "AP":
            s = precision if iou is None else precision[_iou_index(iou_thrs, iou)]
            s = s[:, :, :, a, m]
        else:
            s = recall if iou is None else recall[_iou_index(iou_thrs, iou)]
            s = s[:, :, a, m]
        stats[i] = _mean_valid(s)
    return stats


def _per_class_from_arrays(
    precision: np.ndarray,
    iou_thrs: Sequence[float],
    area_labels: Sequence[str],
    max_dets_list: Sequence[int],
    max_dets: int,
    cat_ids: Sequence[int],
    cat_names: Mapping[int, str],
    num_gt: Mapping[int, int],
) -> dict[str, dict[str, float]]:
    a = list(area_labels).index("all")
    m = _max_dets_index(max_dets_list, max_dets)
    t50, t75 = _iou_index(np.asarray(iou_thrs), 0.5), _iou_index(np.asarray(iou_thrs), 0.75)
    out: dict[str, dict[str, float]] = {}
    for k, cid in enumerate(cat_ids):
        p = precision[:, :, k, a, m]
        name = cat_names.get(int(cid), str(cid))
        if name in out:  # duplicate category names: disambiguate with the id
            name = f"{name} ({cid})"
        out[name] = {
            "category_id": int(cid),
            "num_gt": int(num_gt.get(int(cid), 0)),
            "AP": _mean_valid(p),
            "AP50": _mean_valid(p[t50]),
            "AP75": _mean_valid(p[t75]),
        }
    return out
