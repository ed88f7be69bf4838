"""COCO inputs: ground truth (a file, a dict, or built from streamed :class:`Target` s) normalised once, and
results lists validated against it, each problem reported with the file, the problem and the fix.

Normalisation (see :mod:`codetr.evaluation.coco`): GT annotations renumbered 1..N (pycocotools treats a match
to id 0 as "no match"), missing ``area`` / ``iscrowd`` filled with the box area / 0.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codetr.core.structures import Target
from codetr.evaluation.metrics import _err

__all__ = ["load_coco_annotations", "coco_gt_from_targets", "load_coco_results"]

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
        for key in ("image_id", "category_id"):
            if not _is_int(r[key]):
                raise _err(source, f"entry [{i}] {key}={r[key]!r} is a {type(r[key]).__name__}, not an integer",
                           f"write {key} as the integer id of the annotation file (no quotes)")
        score = r["score"]
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise _err(source, f"entry [{i}] score={score!r} is a {type(score).__name__}, not a number",
                       "write score as a number in [0, 1] (no quotes)")
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
