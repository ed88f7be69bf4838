"""Shared fixtures for the codetr.data tests: a small synthetic set, its shards, tiny COCO builders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from codetr.data.convert import convert_coco
from codetr.data.synth import make_synthetic

#: Synthetic set used by most tests: 26 images in 7 shards of [4, 4, 4, 4, 4, 3, 3].
NUM_IMAGES = 26
SHARD_SIZE = 4


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic(root, NUM_IMAGES, seed=7, image_format="mixed")


@pytest.fixture(scope="session")
def shard_dir(synth_set, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    convert_coco(synth_set.ann_file, synth_set.images_dir, out, shard_size=SHARD_SIZE, num_workers=0,
                 progress=False, verbose=False)
    return out


@pytest.fixture(scope="session")
def synth_json(synth_set) -> dict[str, Any]:
    return json.loads(synth_set.ann_file.read_text())


def write_image(path: Path, w: int, h: int, colour=(90, 140, 200), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, format=fmt)


def write_coco(
    root: Path,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] | None = None,
    create_files: bool = True,
) -> tuple[Path, Path]:
    """Write ``root/ann.json`` and (unless told not to) solid-colour image files for ``images``."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    if create_files:
        for im in images:
            write_image(images_dir / im["file_name"], im.get("width", 40), im.get("height", 30))
    cats = categories if categories is not None else [{"id": 3, "name": "cat"}, {"id": 10, "name": "dog"}]
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return ann, images_dir


def img(i: int, w: int = 40, h: int = 30, ext: str = "png") -> dict[str, Any]:
    return {"id": i, "file_name": f"im{i}.{ext}", "width": w, "height": h}


def ann(aid: int, image_id: int, bbox, category_id: int = 3, **kw: Any) -> dict[str, Any]:
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), **kw}


@pytest.fixture()
def kit():
    """Helpers to build tiny COCO sets (fixtures avoid importing conftest across test folders)."""
    import types

    return types.SimpleNamespace(write_coco=write_coco, img=img, ann=ann, write_image=write_image)
