"""COCO bbox evaluation: one evaluator, two backends, one summary.

What this module guarantees (each point answers a known trap of the usual evaluation code):

* **Two backends, one summariser.** ``faster`` (faster-coco-eval, default, ~10x faster) and
  ``pycocotools`` (parity mode) are only used to *match and accumulate*: they produce the
  ``precision`` (T, R, K, A, M) and ``recall`` (T, K, A, M) arrays. The 12 summary stats and the per-class
  table are computed from those arrays by :func:`summarize_coco_arrays`, the same code for both backends,
  so the two agree to ~1e-16 (pycocotools divides by ``tp + fp + eps``; the C++ backend does not).
* **maxDets is honoured and printed.** pycocotools hard-codes 100 detections for ``stats[0]`` and
  uses ``maxDets[2]`` for the rest (so AP and AR disagree, or AP is -1, as soon as maxDets changes).
  Here every AP/AR "max" stat uses ``max_dets``, and the summary says which value was used. Note that,
  exactly as in COCO, the limit is applied per image *and category* during matching.
* **``evalImgs`` is never read** (faster-coco-eval does not fill it).
* **Edge cases**: no detections at all (AP 0, no crash), images without GT, categories without GT
  (excluded from the means, shown as "—"), GT annotation ids equal to 0 (pycocotools silently treats a
  match to GT id 0 as "no match" — we renumber GT annotations 1..N internally), missing ``area`` /
  ``iscrowd`` keys (filled with the box area / 0).
* **Distributed**: :meth:`CocoEvaluator.synchronize` gathers every rank's results with
  ``all_gather_object`` and deduplicates by image id (eval streams pad ranks with repeated samples).
* The backends' own stdout/log noise is silenced; :class:`CocoMetrics` renders rich tables instead.

``Detections`` given to the evaluator are xyxy absolute pixels in the original image frame with
contiguous labels ``0..C-1``; ``label_to_category_id`` maps them back to the dataset's category ids.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from codetr.core.dist import get_world_size
from codetr.core.structures import Detections, Target

__all__ = [
    "Backend",
    "BACKENDS",
    "EvaluationError",
    "CocoMetrics",
    "CocoEvaluator",
    "coco_gt_from_targets",
    "load_coco_annotations",
    "load_coco_results",
    "evaluate_coco_results",
    "evaluate_predictions_file",
    "summarize_coco_arrays",
]

Backend = Literal["faster", "pycocotools"]
BACKENDS: tuple[str, ...] = ("faster", "pycocotools")

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------------
# Ground truth loading / normalisation
# --------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _read_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.exists():
        raise _err(str(path), f"{what} file not found", f"check the path (cwd is {Path.cwd()})")
    if path.is_dir():
        raise _err(str(path), f"{what} path is a directory, expected a .json file", "pass the json file itself")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise _err(str(path), f"invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                   f"the {what} file must be valid JSON; was it truncated while being written?") from e
    except UnicodeDecodeError as e:
        raise _err(str(path), "not a UTF-8 text file", f"pass the {what} .json file") from e


def _normalize_gt(data: Any, source: str) -> dict:
    """A clean copy of a COCO GT dict, with exactly what bbox evaluation needs.

    Annotation ids are renumbered 1..N (pycocotools treats a match to GT id 0 as "unmatched"),
    ``area`` defaults to the box area, ``iscrowd`` to 0; segmentations and ``ignore`` are dropped
    (bbox evaluation uses neither; both backends overwrite ``ignore`` with ``iscrowd``).
    """
    if not isinstance(data, dict):
        hint = ("this looks like a COCO *results* list (predictions), not annotations"
                if isinstance(data, list) else f"got a {type(data).__name__}")
        raise _err(source, f"annotations must be a COCO dict with images/annotations/categories; {hint}",
                   "pass the ground-truth annotation json (e.g. instances_val2017.json)")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise _err(source, f"annotations have no '{key}' list",
                       "a COCO annotation file needs 'images', 'annotations' and 'categories' lists")
    anns_in = data.get("annotations", [])
    if not isinstance(anns_in, list):
        raise _err(source, "'annotations' is not a list", "fix the annotation file")

    images = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise _err(source, f"images[{i}] has no integer 'id'", "every image needs an integer 'id'")
        images.append({k: img[k] for k in ("id", "width", "height", "file_name") if k in img})
    image_ids = {img["id"] for img in images}
    if len(image_ids) != len(images):
        raise _err(source, "duplicate image ids in 'images'", "make image ids unique")

    categories = []
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise _err(source, f"categories[{i}] has no integer 'id'", "every category needs an integer 'id'")
        categories.append({"id": cat["id"], "name": str(cat.get("name", cat["id"]))})
    cat_ids = {c["id"] for c in categories}
    if len(cat_ids) != len(categories):
        raise _err(source, "duplicate category ids in 'categories'", "make category ids unique")

    anns = []
    skipped_img = skipped_cat = 0
    for i, ann in enumerate(anns_in):
        try:
            bbox = [float(v) for v in ann["bbox"]]
            image_id, category_id = ann["image_id"], ann["category_id"]
        except (KeyError, TypeError, ValueError) as e:
            raise _err(source, f"annotations[{i}] is malformed ({e!r})",
                       "each annotation needs image_id, category_id and bbox [x, y, w, h]") from e
        if len(bbox) != 4:
            raise _err(source, f"annotations[{i}].bbox has {len(bbox)} values", "bbox must be [x, y, w, h]")
        if image_id not in image_ids:
            skipped_img += 1
            continue
        if category_id not in cat_ids:
            skipped_cat += 1
            continue
        area = ann.get("area")
        anns.append({
            "id": len(anns) + 1,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": float(bbox[2] * bbox[3] if area is None else area),
            "iscrowd": int(bool(ann.get("iscrowd", 0))),
        })
    if skipped_img or skipped_cat:
        warnings.warn(
            f"{source}: ignored {skipped_img} annotation(s) whose image_id is not in 'images' and "
            f"{skipped_cat} whose category_id is not in 'categories' (COCO evaluation ignores them too)",
            stacklevel=3,
        )
    return {"images": images, "annotations": anns, "categories": categories}


def load_coco_annotations(gt: dict | str | Path) -> dict:
    """Load (if a path) and normalise a COCO ground-truth dict; raises :class:`EvaluationError`."""
    if isinstance(gt, (str, Path)):
        return _normalize_gt(_read_json(Path(gt), "annotations"), str(gt))
    return _normalize_gt(gt, "annotations")


def _target_annotations(image_id: int, target: Target, mapping: Sequence[int]) -> list[dict]:
    """COCO annotations (ids not yet assigned) of one image's target in the original frame."""
    if len(target) == 0:
        return []
    boxes = target.boxes.detach().to("cpu", torch.float64).numpy()
    labels = target.labels.detach().to("cpu", torch.int64).numpy()
    crowd = target.iscrowd.detach().cpu().numpy().astype(bool)
    wh = boxes[:, 2:] - boxes[:, :2]
    if target.area is not None:
        areas = target.area.detach().to("cpu", torch.float64).numpy()
    else:
        areas = wh[:, 0] * wh[:, 1]
    if labels.min() < 0 or labels.max() >= len(mapping):
        raise ValueError(f"image {image_id}: target label outside [0, {len(mapping)})")
    return [
        {
            "id": 0,
            "image_id": int(image_id),
            "category_id": int(mapping[labels[j]]),
            "bbox": [float(boxes[j, 0]), float(boxes[j, 1]), float(wh[j, 0]), float(wh[j, 1])],
            "area": float(areas[j]),
            "iscrowd": int(crowd[j]),
        }
        for j in range(len(labels))
    ]


def coco_gt_from_targets(
    samples: Iterable[tuple[int, int, int, Target]],
    label_to_category_id: Sequence[int],
    categories: Sequence[Mapping[str, Any] | str],
) -> dict:
    """Build a COCO ground-truth dict in memory from a stream of ``(image_id, width, height, target)``.

    ``target`` must be in the **original** image frame (xyxy absolute pixels, contiguous labels);
    ``target.area`` is the COCO area (``None`` -> box area) and ``target.iscrowd`` is kept. Repeated
    image ids are kept once and negative ids (padding samples of an eval stream) are skipped. ``categories`` is either the COCO
    category dicts (``{"id", "name"}``) or one name per contiguous label.
    """
    mapping = [int(c) for c in label_to_category_id]
    cats: list[dict] = []
    for i, c in enumerate(categories):
        if isinstance(c, str):
            if i >= len(mapping):
                raise ValueError(f"{len(categories)} category names but only {len(mapping)} labels mapped")
            cats.append({"id": mapping[i], "name": c})
        else:
            cats.append({"id": int(c["id"]), "name": str(c.get("name", c["id"]))})
    cat_ids = {c["id"] for c in cats}
    missing = [c for c in mapping if c not in cat_ids]
    if missing:
        raise ValueError(f"label_to_category_id maps to category ids {missing} that are not in categories")

    images: list[dict] = []
    anns: list[dict] = []
    seen: set[int] = set()
    for image_id, width, height, target in samples:
        image_id = int(image_id)
        if image_id < 0 or image_id in seen:  # padding sample / repeated image
            continue
        seen.add(image_id)
        images.append({"id": image_id, "width": int(width), "height": int(height)})
        anns.extend(_target_annotations(image_id, target, mapping))
    for i, a in enumerate(anns):
        a["id"] = i + 1
    return {"images": images, "annotations": anns, "categories": cats}


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------


def _noop(*_: Any, **__: Any) -> None:
    return None


@contextlib.contextmanager
def _quiet():
    """Silence the backends' prints and log records (pycocotools prints; faster-coco-eval logs)."""
    fce_logger = logging.getLogger("faster_coco_eval")
    prev = fce_logger.level
    fce_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        fce_logger.setLevel(prev)


@dataclass
class _Accumulated:
    precision: np.ndarray
    recall: np.ndarray
    iou_thrs: np.ndarray
    area_labels: list[str]
    max_dets_list: list[int]
    cat_ids: list[int]


def _run_backend(gt: dict, dets: list[dict], img_ids: Sequence[int], backend: str, max_dets: int) -> _Accumulated:
    """Match + accumulate with the chosen backend. ``gt`` is normalised; dicts are copied (backends mutate)."""
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        def make_eval(g, d):
            return COCOeval_faster(g, d, iouType="bbox", print_function=_noop)
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        def make_eval(g, d):
            return COCOeval(g, d, iouType="bbox")

    with _quiet():
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [dict(x) for x in gt["images"]],
            "annotations": [dict(x) for x in gt["annotations"]],
            "categories": [dict(x) for x in gt["categories"]],
        }
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": coco_gt.dataset["images"],
            "annotations": [dict(x) for x in dets],
            "categories": coco_gt.dataset["categories"],
        }
        coco_dt.createIndex()
        ev = make_eval(coco_gt, coco_dt)
        ev.params.imgIds = sorted(int(i) for i in img_ids)
        ev.params.catIds = sorted(int(c["id"]) for c in gt["categories"])
        ev.params.maxDets = sorted([1, 10, int(max_dets)])
        ev.evaluate()
        ev.accumulate()
    p = ev.params
    return _Accumulated(
        precision=np.asarray(ev.eval["precision"], dtype=np.float64),
        recall=np.asarray(ev.eval["recall"], dtype=np.float64),
        iou_thrs=np.asarray(p.iouThrs, dtype=np.float64),
        area_labels=list(p.areaRngLbl),
        max_dets_list=[int(m) for m in p.maxDets],
        cat_ids=[int(c) for c in p.catIds],
    )


def _det_record(index: int, image_id: int, category_id: int, bbox: Sequence[float], score: float) -> dict:
    x, y, w, h = (float(v) for v in bbox)
    # Same fields/area as COCO.loadRes() for bbox results.
    return {"id": index, "image_id": int(image_id), "category_id": int(category_id), "bbox": [x, y, w, h],
            "score": float(score), "area": w * h, "iscrowd": 0}


def evaluate_coco_results(
    results: Sequence[Mapping[str, Any]],
    gt: dict | str | Path,
    backend: Backend = "faster",
    max_dets: int = 100,
    image_ids: Iterable[int] | None = None,
) -> CocoMetrics:
    """Evaluate COCO results (``{image_id, category_id, bbox xywh, score}`` dicts) against ``gt``.

    ``image_ids`` restricts the evaluation to those images (default: every image of ``gt``).
    The results are assumed valid (see :func:`load_coco_results` for a validating loader).
    """
    return _evaluate_records(_records(results), load_coco_annotations(gt), backend, max_dets, image_ids)


def _records(results: Sequence[Mapping[str, Any]]) -> list[dict]:
    return [_det_record(i + 1, r["image_id"], r["category_id"], r["bbox"], r["score"]) for i, r in enumerate(results)]


def _evaluate_records(
    dets: list[dict], gt: dict, backend: str, max_dets: int, image_ids: Iterable[int] | None
) -> CocoMetrics:
    _check_backend(backend)
    max_dets = _check_max_dets(max_dets)
    img_ids = sorted({int(i) for i in (image_ids if image_ids is not None else (im["id"] for im in gt["images"]))})
    if not img_ids:
        raise EvaluationError("nothing to evaluate: no images (the annotations have no images, or no "
                              "image was passed to the evaluator)")
    acc = _run_backend(gt, dets, img_ids, backend, max_dets)
    stats = summarize_coco_arrays(acc.precision, acc.recall, acc.iou_thrs, acc.area_labels,
                                  acc.max_dets_list, max_dets)
    img_set = set(img_ids)
    num_gt: dict[int, int] = {}
    for a in gt["annotations"]:
        if not a["iscrowd"] and a["image_id"] in img_set:
            num_gt[a["category_id"]] = num_gt.get(a["category_id"], 0) + 1
    names = {int(c["id"]): c["name"] for c in gt["categories"]}
    per_class = _per_class_from_arrays(acc.precision, acc.iou_thrs, acc.area_labels, acc.max_dets_list,
                                       max_dets, acc.cat_ids, names, num_gt)
    return CocoMetrics.from_stats(
        stats,
        max_dets=max_dets,
        backend=backend,
        per_class=per_class,
        num_images=len(img_ids),
        num_detections=sum(1 for d in dets if d["image_id"] in img_set),
    )


# --------------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------------


def _examples(values: Iterable[Any], n: int = 5) -> str:
    v = sorted(set(values))
    return ", ".join(map(str, v[:n])) + (f", ... ({len(v)} in total)" if len(v) > n else "")


def load_coco_results(predictions: Any, gt: dict, source: str = "predictions") -> list[dict]:
    """Validate a COCO results list against normalised ``gt``; returns it (raises :class:`EvaluationError`)."""
    if isinstance(predictions, dict):
        if "annotations" in predictions and "images" in predictions:
            raise _err(source, "this is a COCO *annotation* file, not a results list",
                       "pass the predictions file (a JSON list of {image_id, category_id, bbox, score})")
        raise _err(source, "expected a JSON list of detections, got an object",
                   "a COCO results file is a list of {image_id, category_id, bbox: [x, y, w, h], score}")
    if not isinstance(predictions, list):
        raise _err(source, f"expected a JSON list of detections, got {type(predictions).__name__}",
                   "a COCO results file is a list of {image_id, category_id, bbox: [x, y, w, h], score}")
    for i, r in enumerate(predictions):
        if not isinstance(r, dict):
            raise _err(source, f"entry [{i}] is a {type(r).__name__}, not an object",
                       "each entry must be {image_id, category_id, bbox: [x, y, w, h], score}")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in r]
        if missing:
            raise _err(source, f"entry [{i}] has no {', '.join(missing)} (keys: {sorted(r)})",
                       "each entry must be {image_id, category_id, bbox: [x, y, w, h], score}")
        bbox = r["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise _err(source, f"entry [{i}] bbox={bbox!r} is not 4 numbers",
                       "bbox must be [x, y, width, height] in absolute pixels")
        if not all(math.isfinite(v) for v in bbox) or not isinstance(r["score"], (int, float)) \
                or not math.isfinite(r["score"]):
            raise _err(source, f"entry [{i}] has a non-finite bbox or score ({bbox!r}, {r['score']!r})",
                       "drop NaN/inf detections before writing the results (the model may have diverged)")
        if bbox[2] < 0 or bbox[3] < 0:
            raise _err(source, f"entry [{i}] has a negative width/height (bbox={bbox!r})",
                       "COCO bbox is [x, y, width, height]; convert xyxy boxes with w = x2 - x1, h = y2 - y1")

    img_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    bad_img = [r["image_id"] for r in predictions if r["image_id"] not in img_ids]
    if bad_img:
        raise _err(source, f"{len(bad_img)} detection(s) reference image ids not in the annotations: "
                   f"{_examples(bad_img)}",
                   "predict on the same split as the annotations, and write the dataset's image ids "
                   "(not the loader's indices)")
    bad_cat = [r["category_id"] for r in predictions if r["category_id"] not in cat_ids]
    if bad_cat:
        hint = "map contiguous labels back with label_to_category_id"
        used = {r["category_id"] for r in predictions}
        if all(c + 1 in cat_ids for c in used):
            hint = "the ids look 0-based/contiguous (off by one?): " + hint
        raise _err(source, f"{len(bad_cat)} detection(s) reference category ids not in the annotations: "
                   f"{_examples(bad_cat)} (annotation category ids: {_examples(cat_ids, 10)})", hint)

    # Heuristic: boxes written as xyxy instead of xywh overshoot the image far more often.
    sizes = {im["id"]: (im.get("width"), im.get("height")) for im in gt["images"]}
    n_checked = n_out = 0
    for r in predictions:
        w_img, h_img = sizes[r["image_id"]]
        if not w_img or not h_img:
            continue
        x, y, w, h = r["bbox"]
        n_checked += 1
        n_out += (x + w > w_img * 1.05 + 2) or (y + h > h_img * 1.05 + 2)
    if n_checked >= 20 and n_out / n_checked > 0.25:
        warnings.warn(
            f"{source}: {n_out}/{n_checked} boxes extend well past the image border; are they xyxy "
            "instead of COCO [x, y, width, height]?",
            stacklevel=3,
        )
    return predictions


def evaluate_predictions_file(
    predictions_json: str | Path,
    annotations_json: str | Path,
    backend: Backend = "faster",
    max_dets: int = 100,
) -> CocoMetrics:
    """Evaluate a standard COCO results file against a COCO annotation file (all annotated images).

    Raises :class:`EvaluationError` (file + problem + fix) for missing files, invalid JSON, and
    predictions whose image or category ids are not in the annotations. An empty predictions list
    warns and gives AP 0.
    """
    _check_backend(backend)
    max_dets = _check_max_dets(max_dets)
    gt_raw = _read_json(Path(annotations_json), "annotations")
    preds_raw = _read_json(Path(predictions_json), "predictions")
    if isinstance(gt_raw, list) and isinstance(preds_raw, dict) and "images" in preds_raw:
        raise _err(f"{predictions_json} / {annotations_json}",
                   "the two files look swapped (the predictions file is a COCO annotation dict and the "
                   "annotations file is a list)", "pass --predictions RESULTS.json --annotations ANNOTATIONS.json")
    gt = _normalize_gt(gt_raw, str(annotations_json))
    preds = load_coco_results(preds_raw, gt, str(predictions_json))
    if not preds:
        warnings.warn(f"{predictions_json}: the predictions list is empty; every AP/AR is 0",
                      stacklevel=2)
    return _evaluate_records(_records(preds), gt, backend, max_dets, None)


# --------------------------------------------------------------------------------------------------
# Streaming evaluator
# --------------------------------------------------------------------------------------------------


class CocoEvaluator:
    """Accumulates :class:`Detections` per image and computes COCO bbox metrics.

    Args:
        gt: COCO annotation dict or json path. ``None`` = *streaming GT*: pass ``categories`` and feed
            the ground truth with :meth:`add_targets` (e.g. from webdataset shards; no json needed).
        label_to_category_id: category id of each contiguous label. ``None`` = the sorted category
            ids of ``gt`` (label i -> i-th smallest id), the usual contiguous remapping.
        backend: ``"faster"`` (faster-coco-eval) or ``"pycocotools"``.
        max_dets: maxDets is ``[1, 10, max_dets]``; every AP and the "max" ARs use ``max_dets``.
        categories: streaming mode only: COCO category dicts or one name per label.

    Images are evaluated if they went through :meth:`update` (an image with no detection still counts:
    its GT are misses). Call :meth:`synchronize` on every rank before :meth:`compute` under DDP.
    """

    def __init__(
        self,
        gt: dict | str | Path | None,
        label_to_category_id: Sequence[int] | None = None,
        backend: Backend = "faster",
        max_dets: int = 100,
        *,
        categories: Sequence[Mapping[str, Any] | str] | None = None,
    ) -> None:
        self.backend = _check_backend(backend)
        self.max_dets = _check_max_dets(max_dets)
        if gt is None:
            if categories is None or label_to_category_id is None:
                raise ValueError("streaming GT (gt=None) needs both label_to_category_id and categories")
            self._gt: dict | None = None
            self._gt_categories = coco_gt_from_targets([], label_to_category_id, categories)["categories"]
        else:
            self._gt = load_coco_annotations(gt)
            self._gt_categories = self._gt["categories"]
        cat_ids = sorted(c["id"] for c in self._gt_categories)
        if label_to_category_id is None:
            label_to_category_id = cat_ids
        self.label_to_category_id = [int(c) for c in label_to_category_id]
        unknown = [c for c in self.label_to_category_id if c not in set(cat_ids)]
        if unknown:
            raise EvaluationError(
                f"label_to_category_id maps to category ids {unknown} that are not in the annotations "
                f"(annotation ids: {_examples(cat_ids, 10)})\n  fix: use the mapping the dataset was built with"
            )
        if len(set(self.label_to_category_id)) != len(self.label_to_category_id):
            raise EvaluationError("label_to_category_id maps two labels to the same category id\n"
                                  "  fix: use the mapping the dataset was built with")
        self._gt_image_ids = None if self._gt is None else {im["id"] for im in self._gt["images"]}
        self.reset()

    # -- accumulation -------------------------------------------------------------------------------

    def reset(self) -> None:
        # image_id -> (boxes xywh float64 (K, 4), scores float64 (K,), category ids int64 (K,))
        self._preds: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._targets: dict[int, tuple[dict, list[dict]]] = {}  # streaming GT: id -> (image, annotations)
        self._synchronized = False
        self.num_duplicates = 0  # repeated real image ids (kept once)
        self.num_padding = 0  # samples with a negative image id (padding), skipped
        self.num_dropped_nonfinite = 0
        self._warned_many = False

    @property
    def num_images(self) -> int:
        return len(self._preds)

    def update(self, image_ids: Sequence[int] | torch.Tensor, detections: Sequence[Detections]) -> None:
        """Add the detections of a batch (``Batch.image_ids`` order).

        Negative image ids are padding samples and are skipped; a repeated image id keeps its first
        detections (streams may also pad by repeating real samples).
        """
        ids = [int(i) for i in (image_ids.tolist() if isinstance(image_ids, torch.Tensor) else image_ids)]
        if len(ids) != len(detections):
            raise ValueError(f"update() got {len(ids)} image ids but {len(detections)} Detections")
        n_labels = len(self.label_to_category_id)
        mapping = np.asarray(self.label_to_category_id, dtype=np.int64)
        for image_id, det in zip(ids, detections):
            if image_id < 0:  # padding sample (codetr.data.collate.PADDING_IMAGE_ID)
                self.num_padding += 1
                continue
            if self._gt_image_ids is not None and image_id not in self._gt_image_ids:
                raise EvaluationError(
                    f"image id {image_id} is not in the annotations\n  fix: evaluate on the split the "
                    "annotations describe, and pass the dataset's image ids (not batch indices)"
                )
            if image_id in self._preds:
                self.num_duplicates += 1
                continue
            boxes = det.boxes.detach().to("cpu", torch.float64).numpy().reshape(-1, 4)
            scores = det.scores.detach().to("cpu", torch.float64).numpy().reshape(-1)
            labels = det.labels.detach().to("cpu", torch.int64).numpy().reshape(-1)
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(f"image {image_id}: Detections fields have different lengths")
            ok = np.isfinite(boxes).all(1) & np.isfinite(scores)
            if not ok.all():
                self.num_dropped_nonfinite += int((~ok).sum())
                boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
            if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
                bad = int(labels.max() if labels.max() >= n_labels else labels.min())
                raise EvaluationError(
                    f"image {image_id}: detection label {bad}"
                    f" outside [0, {n_labels})\n  fix: num_classes of the model must equal the number of "
                    "dataset categories (len(label_to_category_id)); background must not be emitted"
                )
            if len(boxes) > self.max_dets and not self._warned_many:
                self._warned_many = True
                warnings.warn(
                    f"image {image_id} has {len(boxes)} detections > max_dets={self.max_dets}; COCO applies "
                    "maxDets per image *and category*, so more than max_dets detections of an image can "
                    "be scored. Limit the model's top-k to max_dets for the standard protocol.",
                    stacklevel=2,
                )
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            self._preds[image_id] = (xywh, scores, mapping[labels])
        self._synchronized = False

    def add_targets(
        self,
        image_ids: Sequence[int] | torch.Tensor,
        sizes_wh: Sequence[tuple[int, int]] | torch.Tensor,
        targets: Sequence[Target],
    ) -> None:
        """Streaming GT: add ground truth in the **original** frame (``Target.area`` = COCO area)."""
        if self._gt is not None:
            raise RuntimeError("add_targets() is for streaming GT; this evaluator was given a gt file/dict")
        ids = [int(i) for i in (image_ids.tolist() if isinstance(image_ids, torch.Tensor) else image_ids)]
        sizes = sizes_wh.tolist() if isinstance(sizes_wh, torch.Tensor) else list(sizes_wh)
        if not (len(ids) == len(sizes) == len(targets)):
            raise ValueError("add_targets() needs as many image ids, sizes and targets")
        for image_id, (w, h), t in zip(ids, sizes, targets):
            if image_id >= 0 and image_id not in self._targets:
                image = {"id": image_id, "width": int(w), "height": int(h)}
                self._targets[image_id] = (image, _target_annotations(image_id, t, self.label_to_category_id))
        self._synchronized = False

    # -- distributed --------------------------------------------------------------------------------

    def _merge(self, parts: Sequence[tuple[dict, dict]]) -> None:
        """Merge per-rank ``(preds, targets)`` in rank order; the first occurrence of an image wins."""
        preds: dict = {}
        targets: dict = {}
        for p, t in parts:
            for k, v in p.items():
                if k in preds:
                    self.num_duplicates += 1
                else:
                    preds[k] = v
            for k, v in t.items():
                targets.setdefault(k, v)
        self._preds, self._targets = preds, targets

    def synchronize(self) -> None:
        """Gather every rank's results onto every rank (collective: call it on all ranks).

        No-op without an initialised process group. Duplicated image ids across ranks are dropped.
        """
        if get_world_size() > 1:
            gathered: list[Any] = [None] * get_world_size()
            torch.distributed.all_gather_object(gathered, (self._preds, self._targets))
            self._merge(gathered)
        self._synchronized = True

    # -- results ------------------------------------------------------------------------------------

    def _gt_dict(self) -> dict:
        if self._gt is not None:
            return self._gt
        missing = [i for i in self._preds if i not in self._targets]
        if missing:
            raise EvaluationError(
                f"{len(missing)} image(s) have detections but no ground truth was added: {_examples(missing)}"
                "\n  fix: call add_targets() for every image passed to update()"
            )
        ids = sorted(self._targets)
        anns = [a for i in ids for a in self._targets[i][1]]
        return _normalize_gt({"images": [self._targets[i][0] for i in ids], "annotations": anns,
                              "categories": self._gt_categories}, "streamed targets")

    def to_coco_results(self) -> list[dict]:
        """The accumulated detections as a COCO results list (xywh, original category ids)."""
        out = []
        for image_id in sorted(self._preds):
            xywh, scores, cats = self._preds[image_id]
            for b, s, c in zip(xywh.tolist(), scores.tolist(), cats.tolist()):
                out.append({"image_id": image_id, "category_id": int(c), "bbox": b, "score": s})
        return out

    def compute(self) -> CocoMetrics:
        """COCO metrics over the images seen by :meth:`update` (and, under DDP, gathered)."""
        if get_world_size() > 1 and not self._synchronized:
            warnings.warn("CocoEvaluator.compute() under DDP without synchronize(): metrics cover this "
                          "rank's images only", stacklevel=2)
        if not self._preds:
            raise EvaluationError("CocoEvaluator.compute(): no image was added\n  fix: call update() with "
                                  "every evaluated batch (images without detections too)")
        if self.num_dropped_nonfinite:
            warnings.warn(f"dropped {self.num_dropped_nonfinite} detection(s) with NaN/inf box or score",
                          stacklevel=2)
        gt = self._gt_dict()
        n_gt_images = len(gt["images"])
        if self._gt is not None and len(self._preds) < n_gt_images:
            warnings.warn(
                f"evaluating {len(self._preds)} of the {n_gt_images} annotated images; the other "
                f"{n_gt_images - len(self._preds)} never reached the evaluator (subset on purpose, or "
                "samples dropped by the data stream?)",
                stacklevel=2,
            )
        dets: list[dict] = []
        for image_id in sorted(self._preds):
            xywh, scores, cats = self._preds[image_id]
            for b, sc, c in zip(xywh.tolist(), scores.tolist(), cats.tolist()):
                dets.append(_det_record(len(dets) + 1, image_id, c, b, sc))
        return _evaluate_records(dets, gt, self.backend, self.max_dets, self._preds.keys())
