"""A generated COCO fixture: ~50 images, non-contiguous category ids, crowd boxes, images without GT,
a category without GT, and random detections (jittered, perfect, false positives, >100 per image).

All coordinates are multiples of 0.25 so they survive float32 tensors and xyxy<->xywh exactly, which
lets the evaluator path (Detections) be compared bit-for-bit with the results-file path.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from codetr.core.structures import Detections, Target

CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 7, "name": "train"},
    {"id": 12, "name": "unused"},  # no GT anywhere
]
LABEL_TO_CAT = [1, 3, 7, 12]
GT_CATS = [1, 3, 7]


def _q(x):
    """Quantise to multiples of 0.25."""
    return np.round(np.asarray(x, dtype=np.float64) * 4) / 4


def _rand_box(rng, im, lo, hi):
    bw, bh = _q(rng.uniform(lo, hi)), _q(rng.uniform(lo, hi))
    x, y = _q(rng.uniform(0, im["width"] - bw)), _q(rng.uniform(0, im["height"] - bh))
    return [float(x), float(y), float(bw), float(bh)]


def make_coco_fixture(seed: int = 0, num_images: int = 50):
    rng = np.random.RandomState(seed)
    images, anns, results = [], [], []
    for i in range(num_images):
        image_id = 1000 + 7 * i
        w_img, h_img = int(rng.choice([480, 640, 800])), int(rng.choice([360, 480, 600]))
        images.append({"id": image_id, "width": w_img, "height": h_img, "file_name": f"{image_id}.jpg"})
        n_gt = 0 if i % 6 == 5 else int(rng.randint(1, 9))  # every 6th image has no GT
        for _ in range(n_gt):
            side = float(np.exp(rng.uniform(np.log(6), np.log(320))))  # small, medium and large
            bw, bh = _q(side * rng.uniform(0.6, 1.4)), _q(side * rng.uniform(0.6, 1.4))
            bw, bh = float(max(bw, 2.0)), float(max(bh, 2.0))
            x, y = _q(rng.uniform(0, max(w_img - bw, 1))), _q(rng.uniform(0, max(h_img - bh, 1)))
            crowd = int(rng.rand() < 0.1)
            anns.append({
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": int(rng.choice(GT_CATS)),
                "bbox": [float(x), float(y), bw, bh],
                "area": float(_q(bw * bh * rng.uniform(0.55, 1.0))),
                "iscrowd": crowd,
                "segmentation": [] if not crowd else {"counts": [], "size": [h_img, w_img]},
            })
    for a in anns:
        x, y, w, h = a["bbox"]
        u = rng.rand()
        if u < 0.2:  # perfect
            results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h],
                            "score": float(np.round(rng.uniform(0.7, 1.0), 4))})
        elif u < 0.85:  # jittered, sometimes wrong class
            j = _q(rng.normal(0, 0.12, 4) * np.array([w, h, w, h]))
            cat = a["category_id"] if rng.rand() < 0.85 else int(rng.choice(GT_CATS))
            results.append({"image_id": a["image_id"], "category_id": cat,
                            "bbox": [float(x + j[0]), float(y + j[1]),
                                     float(max(w + j[2], 1)), float(max(h + j[3], 1))],
                            "score": float(np.round(rng.uniform(0.05, 1.0), 4))})
    for im in images:  # false positives everywhere, incl. images without GT and the unused category
        for _ in range(int(rng.randint(0, 12))):
            results.append({"image_id": im["id"], "category_id": int(rng.choice(LABEL_TO_CAT)),
                            "bbox": _rand_box(rng, im, 4, 200),
                            "score": float(np.round(rng.uniform(0.0, 0.6), 4))})
    # Dense images: 250 detections of one category so maxDets=300 differs from 100; the low-score tail
    # holds true positives that only count with 300.
    for im in images[:6]:
        gts = [a for a in anns if a["image_id"] == im["id"] and not a["iscrowd"]]
        cat = gts[0]["category_id"] if gts else 1
        for k in range(250):
            results.append({"image_id": im["id"], "category_id": cat, "bbox": _rand_box(rng, im, 8, 120),
                            "score": float(np.round(rng.uniform(0.3, 0.9), 4))})
        for a in gts:
            if a["category_id"] == cat:
                results.append({"image_id": im["id"], "category_id": cat, "bbox": list(a["bbox"]), "score": 0.01})
    gt = {"info": {"description": "codetr eval fixture"}, "images": images, "annotations": anns,
          "categories": copy.deepcopy(CATEGORIES)}
    return gt, results


def perfect_results(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in gt["annotations"] if not a["iscrowd"]]


def results_to_detections(results: list[dict], image_ids: list[int], label_to_cat=LABEL_TO_CAT) -> list[Detections]:
    """COCO results -> per-image Detections (xyxy, contiguous labels), in ``image_ids`` order."""
    cat_to_label = {c: i for i, c in enumerate(label_to_cat)}
    per = {i: [] for i in image_ids}
    for r in results:
        if r["image_id"] in per:
            per[r["image_id"]].append(r)
    out = []
    for i in image_ids:
        rs = per[i]
        b = torch.tensor([r["bbox"] for r in rs], dtype=torch.float32).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        out.append(Detections(b, torch.tensor([r["score"] for r in rs], dtype=torch.float32),
                              torch.tensor([cat_to_label[r["category_id"]] for r in rs], dtype=torch.int64)))
    return out


def gt_to_targets(gt: dict, label_to_cat=LABEL_TO_CAT):
    """COCO GT -> [(image_id, width, height, Target in the original frame)]."""
    cat_to_label = {c: i for i, c in enumerate(label_to_cat)}
    per = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        per[a["image_id"]].append(a)
    out = []
    for im in gt["images"]:
        anns = per[im["id"]]
        b = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        t = Target(b, torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
                   torch.tensor([bool(a["iscrowd"]) for a in anns], dtype=torch.bool).reshape(-1),
                   torch.tensor([a["area"] for a in anns], dtype=torch.float32).reshape(-1))
        out.append((im["id"], im["width"], im["height"], t))
    return out
