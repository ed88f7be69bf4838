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
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codetr.core.dist import get_world_size
from codetr.core.structures import Detections, Target
from codetr.evaluation.annotations import (_examples, _normalize_gt, _read_json, _target_annotations,
                                           coco_gt_from_targets, load_coco_annotations, load_coco_results)
from codetr.evaluation.metrics import (Backend, CocoMetrics, EvaluationError, _check_backend,
                                       _check_max_dets, _err, _per_class_from_arrays, summarize_coco_arrays)

__all__ = ["CocoEvaluator", "evaluate_coco_results", "evaluate_predictions_file"]

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
