"""Read and validate a COCO detection annotation file (shared by the converter and CocoFolderDataset).

:func:`prepare_coco` performs *every* check before anything is written or trained on:

* errors (raise :class:`~codetr.data.format.DataError`, naming the first few offenders and the fix):
  unreadable JSON, missing ``images``/``categories``, duplicate category ids, malformed image entries,
  duplicate image ids, annotations pointing to unknown image ids or unknown category ids, malformed
  ``bbox`` values, missing image files (checked with ``os.path.exists``);
* fixes (counted in :class:`~codetr.data.format.ConversionCounts`): boxes reaching outside the image
  are clipped to it, zero/negative-size boxes are dropped, boxes entirely outside the image are
  dropped; images without ``width``/``height`` get them from the file header;
* kept as-is: crowd annotations (``iscrowd=1``) and images without any box.

Records hold annotations only; image bytes are never loaded here.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codetr.data.format import CategoryInfo, ConversionCounts, DataError, category_mapping

__all__ = ["ImageRecord", "PreparedCoco", "prepare_coco", "MAX_LISTED"]

#: How many offenders an error message lists.
MAX_LISTED = 5
_SUPPORTED_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(slots=True)
class ImageRecord:
    """One image of a prepared COCO file.

    Attributes:
        path: path of the image file (``images_dir / file_name``).
        meta: the :class:`~codetr.data.format.SampleMeta` fields as plain Python values (boxes are
            COCO xywh absolute pixels, clipped, w/h > 0).
    """

    path: str
    meta: dict[str, Any]


@dataclass
class PreparedCoco:
    """A validated COCO file: categories in contiguous-label order and one record per image."""

    ann_file: Path
    images_dir: Path
    categories: list[CategoryInfo]
    category_id_to_label: dict[int, int]
    records: list[ImageRecord]
    counts: ConversionCounts
    warnings: list[str] = field(default_factory=list)

    @property
    def label_to_category_id(self) -> list[int]:
        return [c.id for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _listing(items: list[str], total: int) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... ({total - MAX_LISTED} more)" if total > MAX_LISTED else "")


def _read_json(ann_file: Path) -> dict[str, Any]:
    if not ann_file.exists():
        raise DataError(f"{ann_file}: annotation file not found")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{ann_file}: cannot parse JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: missing or invalid '{key}' list (COCO detection format expected)")
    if "annotations" in data and not isinstance(data["annotations"], list):
        raise DataError(f"{ann_file}: 'annotations' must be a list")
    return data


def _image_size_from_file(path: str) -> tuple[int, int]:
    from PIL import Image  # local: keeps spawn-started converter workers light

    with Image.open(path) as im:
        return int(im.width), int(im.height)


def prepare_coco(ann_file: str | os.PathLike[str], images_dir: str | os.PathLike[str]) -> PreparedCoco:
    """Parse and validate a COCO detection file; see the module docstring for the checks.

    Args:
        ann_file: COCO json (``images``, ``annotations``, ``categories``).
        images_dir: folder that ``images[*].file_name`` is relative to.

    Returns:
        A :class:`PreparedCoco`; ``records`` keep the order of ``images`` in the file.

    Raises:
        DataError: listing every problem group found (nothing is written when this is raised).
    """
    ann_path = Path(ann_file)
    img_root = Path(images_dir)
    if not img_root.is_dir():
        raise DataError(f"{img_root}: images directory not found (it must contain the files named in {ann_path})")
    data = _read_json(ann_path)
    warnings: list[str] = []
    categories, cat2label = category_mapping(data["categories"])
    if not categories:
        raise DataError(f"{ann_path}: 'categories' is empty; a detection dataset needs at least one category")
    names = [c.name for c in categories]
    dup_names = sorted({n for n in names if names.count(n) > 1})
    if dup_names:
        warnings.append(f"duplicate category names {dup_names[:MAX_LISTED]} (ids differ, labels stay distinct)")

    problems: list[str] = []

    # ---- images -------------------------------------------------------------------------------
    bad_images: list[str] = []
    images: list[dict[str, Any]] = []
    id_counts: Counter[int] = Counter()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            bad_images.append(f"images[{i}] is not an object")
            continue
        iid, fname = im.get("id"), im.get("file_name")
        if not _is_int(iid) or iid < 0:
            bad_images.append(f"images[{i}] id={iid!r} (must be an int >= 0)")
            continue
        if not isinstance(fname, str) or not fname:
            bad_images.append(f"images[{i}] (id {iid}) has no 'file_name'")
            continue
        w, h = im.get("width"), im.get("height")
        if (w is not None and not (_is_int(w) and w > 0)) or (h is not None and not (_is_int(h) and h > 0)):
            bad_images.append(f"images[{i}] (id {iid}) width/height {w!r}x{h!r} (must be ints > 0)")
            continue
        if Path(fname).suffix.lower() not in _SUPPORTED_SUFFIXES:
            bad_images.append(f"images[{i}] (id {iid}) file '{fname}' (supported: jpg, png, webp, bmp, tiff)")
            continue
        id_counts[iid] += 1
        images.append(im)
    if bad_images:
        problems.append(f"{len(bad_images)} malformed image entries: {_listing(bad_images, len(bad_images))}")
    dups = [f"{iid} (x{n})" for iid, n in id_counts.items() if n > 1]
    if dups:
        problems.append(
            f"{len(dups)} duplicate image ids in 'images': {_listing(dups, len(dups))}; image ids must be unique"
        )

    missing = [im["file_name"] for im in images if not os.path.exists(os.path.join(img_root, im["file_name"]))]
    if missing:
        problems.append(
            f"{len(missing)} of {len(images)} image files are missing under {img_root}: "
            f"{_listing(missing, len(missing))}; check that the images directory is the folder the "
            "'file_name' entries are relative to"
        )

    # ---- annotations --------------------------------------------------------------------------
    anns = data.get("annotations")
    if anns is None:
        warnings.append("no 'annotations' list: every image is written without boxes")
        anns = []
    known_ids = set(id_counts)
    unknown_cat: list[str] = []
    unknown_img: list[str] = []
    bad_bbox: list[str] = []
    per_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for j, ann in enumerate(anns):
        if not isinstance(ann, dict):
            bad_bbox.append(f"annotations[{j}] is not an object")
            continue
        aid = ann.get("id", f"#{j}")
        iid, cid, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        if not _is_int(iid) or iid not in known_ids:
            unknown_img.append(f"ann {aid} -> image_id {iid!r}")
            continue
        if not _is_int(cid) or cid not in cat2label:
            unknown_cat.append(f"ann {aid} (image {iid}) -> category_id {cid!r}")
            continue
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            bad_bbox.append(f"ann {aid} (image {iid}) bbox={bbox!r}")
            continue
        per_image[iid].append(ann)
    if unknown_img:
        problems.append(
            f"{len(unknown_img)} annotations reference image ids not in 'images': "
            f"{_listing(unknown_img, len(unknown_img))}"
        )
    if unknown_cat:
        problems.append(
            f"{len(unknown_cat)} annotations use category ids not in 'categories' "
            f"(known ids: {_listing([str(c.id) for c in categories], len(categories))}): "
            f"{_listing(unknown_cat, len(unknown_cat))}; add the categories or remove these annotations"
        )
    if bad_bbox:
        problems.append(
            f"{len(bad_bbox)} annotations have a malformed 'bbox' (need 4 finite numbers, COCO xywh "
            f"pixels): {_listing(bad_bbox, len(bad_bbox))}"
        )
    if problems:
        raise DataError(
            f"{ann_path}: {len(problems)} problem(s) found, nothing was written:\n  - " + "\n  - ".join(problems)
        )

    # ---- records (clip / drop / count) ---------------------------------------------------------
    counts = ConversionCounts(images=len(images), annotations=len(anns))
    boxes_per_cat: Counter[int] = Counter()
    records: list[ImageRecord] = []
    for im in images:
        iid = im["id"]
        path = os.path.join(img_root, im["file_name"])
        width, height = im.get("width"), im.get("height")
        if width is None or height is None:
            try:
                width, height = _image_size_from_file(path)
            except Exception as exc:  # noqa: BLE001 - any decode error is a data error here
                raise DataError(f"{path}: image has no width/height in {ann_path} and its header is unreadable ({exc})") from exc
            counts.image_sizes_read_from_files += 1
        boxes: list[list[float]] = []
        cids: list[int] = []
        labels: list[int] = []
        crowd: list[int] = []
        area: list[float] = []
        for ann in per_image.get(iid, ()):
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                counts.boxes_dropped_degenerate += 1
                continue
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(width)), min(y + h, float(height))
            if x1 <= x0 or y1 <= y0:
                counts.boxes_dropped_outside += 1
                continue
            if x0 != x or y0 != y or x1 != x + w or y1 != y + h:
                counts.boxes_clipped += 1
            cw, ch = x1 - x0, y1 - y0
            a = ann.get("area")
            boxes.append([x0, y0, cw, ch])
            cids.append(int(ann["category_id"]))
            labels.append(cat2label[int(ann["category_id"])])
            is_crowd = 1 if ann.get("iscrowd", 0) else 0
            crowd.append(is_crowd)
            area.append(float(a) if _is_number(a) and a > 0 else cw * ch)
            counts.crowd_boxes += is_crowd
            boxes_per_cat[int(ann["category_id"])] += 1
        if not boxes:
            counts.images_without_boxes += 1
        counts.boxes_written += len(boxes)
        records.append(
            ImageRecord(
                path=path,
                meta={
                    "image_id": iid,
                    "file_name": im["file_name"],
                    "width": int(width),
                    "height": int(height),
                    "boxes": boxes,
                    "category_ids": cids,
                    "labels": labels,
                    "iscrowd": crowd,
                    "area": area,
                },
            )
        )
    counts.images_written = len(records)
    counts.categories_without_boxes = [c.id for c in categories if boxes_per_cat[c.id] == 0]
    if counts.categories_without_boxes:
        warnings.append(
            f"{len(counts.categories_without_boxes)} categories have no boxes (ids "
            f"{_listing([str(c) for c in counts.categories_without_boxes], len(counts.categories_without_boxes))}); "
            "they keep their label but cannot be learned"
        )
    if records and counts.images_without_boxes / len(records) > 0.5:
        warnings.append(
            f"{counts.images_without_boxes} of {len(records)} images have no boxes; check the annotation file"
        )
    if counts.boxes_dropped_degenerate or counts.boxes_dropped_outside:
        warnings.append(
            f"dropped {counts.boxes_dropped_degenerate} zero/negative-size boxes and "
            f"{counts.boxes_dropped_outside} boxes entirely outside their image"
        )
    return PreparedCoco(
        ann_file=ann_path,
        images_dir=img_root,
        categories=categories,
        category_id_to_label=cat2label,
        records=records,
        counts=counts,
        warnings=warnings,
    )
