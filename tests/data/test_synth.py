"""Synthetic dataset: determinism, validity and variety."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from codetr.data.coco import prepare_coco
from codetr.data.synth import SYNTH_CATEGORIES, make_synthetic, make_synthetic_splits


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_output(tmp_path):
    a = make_synthetic(tmp_path / "a", 6, seed=3, image_format="mixed")
    b = make_synthetic(tmp_path / "b", 6, seed=3, image_format="mixed")
    fa, fb = _files(a.root), _files(b.root)
    assert fa.keys() == fb.keys() and len(fa) == 7
    assert all(fa[k] == fb[k] for k in fa)


def test_image_depends_only_on_seed_and_index(tmp_path):
    small = make_synthetic(tmp_path / "s", 2, seed=11)
    large = make_synthetic(tmp_path / "l", 4, seed=11)
    for name in ("000001.jpg", "000002.jpg"):
        assert (small.images_dir / name).read_bytes() == (large.images_dir / name).read_bytes()


def test_different_seeds_differ(tmp_path):
    a = make_synthetic(tmp_path / "a", 2, seed=1)
    b = make_synthetic(tmp_path / "b", 2, seed=2)
    assert (a.images_dir / "000001.jpg").read_bytes() != (b.images_dir / "000001.jpg").read_bytes()


def test_annotations_are_valid_and_varied(synth_set, synth_json):
    prepared = prepare_coco(synth_set.ann_file, synth_set.images_dir)  # full validation
    assert prepared.counts.boxes_clipped == 0
    assert prepared.counts.boxes_dropped_degenerate == prepared.counts.boxes_dropped_outside == 0
    assert [c["id"] for c in synth_json["categories"]] == [c["id"] for c in SYNTH_CATEGORIES]
    assert [c["name"] for c in synth_json["categories"]] == ["circle", "rectangle", "triangle", "star", "cross", "ring"]
    sizes = {(im["width"], im["height"]) for im in synth_json["images"]}
    assert len(sizes) > 10 and all(224 <= w <= 320 and 224 <= h <= 320 for w, h in sizes)
    assert any(w != h for w, h in sizes)
    for im in synth_json["images"]:
        with Image.open(synth_set.images_dir / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
    per_image = {im["id"]: 0 for im in synth_json["images"]}
    rel, ar = [], []
    sizes_by_id = {im["id"]: (im["width"], im["height"]) for im in synth_json["images"]}
    for a in synth_json["annotations"]:
        per_image[a["image_id"]] += 1
        x, y, w, h = a["bbox"]
        W, H = sizes_by_id[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H and w > 0 and h > 0
        assert 0 < a["area"] <= w * h and a["iscrowd"] == 0
        rel.append(max(w, h) / min(W, H))
        ar.append(w / h)
    assert max(per_image.values()) <= 8
    assert len({a["category_id"] for a in synth_json["annotations"]}) == 6
    assert min(rel) < 0.2 and max(rel) > 0.5  # wide size range
    assert min(ar) < 0.6 and max(ar) > 1.7  # wide aspect-ratio range


def test_some_images_are_empty_and_objects_overlap(tmp_path):
    ds = make_synthetic(tmp_path, 40, seed=0)
    data = json.loads(ds.ann_file.read_text())
    with_boxes = {a["image_id"] for a in data["annotations"]}
    assert len(with_boxes) < 40  # ~5% empty images
    overlaps = 0
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    for boxes in by_image.values():
        b = np.array(boxes)
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                ix = min(b[i, 0] + b[i, 2], b[j, 0] + b[j, 2]) - max(b[i, 0], b[j, 0])
                iy = min(b[i, 1] + b[i, 3], b[j, 1] + b[j, 3]) - max(b[i, 1], b[j, 1])
                overlaps += ix > 0 and iy > 0
    assert overlaps > 5


def test_splits_use_different_streams(tmp_path):
    out = make_synthetic_splits(tmp_path, 3, 2, seed=5)
    assert out["train"].num_images == 3 and out["val"].num_images == 2
    assert (out["train"].images_dir / "000001.jpg").read_bytes() != (out["val"].images_dir / "000001.jpg").read_bytes()
