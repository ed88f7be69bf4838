"""COCO -> shards conversion: round trip, validation errors, fixes and counts, parallel writing."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

from codetr.data.convert import convert_coco, plan_shard_sizes
from codetr.data.format import (
    DataError,
    DatasetIndex,
    SampleMeta,
    load_index,
    make_key,
    sanitize_key,
    save_index,
)
from codetr.data.loader_base import LoaderOptions
from codetr.data.stream import ShardLoader
from codetr.data.transforms import build_transforms



def _convert(ann, images, out, **kw):
    kw.setdefault("num_workers", 0)
    return convert_coco(ann, images, out, progress=False, verbose=False, **kw)


def _tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


# ---------------------------------------------------------------------------------------------
# format helpers
# ---------------------------------------------------------------------------------------------


def test_plan_shard_sizes_is_balanced():
    assert plan_shard_sizes(1001, 1000) == [501, 500]
    assert plan_shard_sizes(26, 4) == [4, 4, 4, 4, 4, 3, 3]
    assert plan_shard_sizes(5, 100, num_shards=10) == [1, 1, 1, 1, 1]
    assert plan_shard_sizes(0, 10) == []


def test_keys_have_no_dots_or_slashes():
    key = make_key(397133, "train2017/000000397133.v2.jpg")
    assert key == "000000397133_000000397133_v2"
    assert "." not in sanitize_key("a.b/c d") and "/" not in sanitize_key("a.b/c d")
    with pytest.raises(DataError):
        make_key(-1, "x.jpg")


def test_load_index_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no index.json"):
        load_index(tmp_path)
    bad = tmp_path / "index.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot read index"):
        load_index(bad)
    bad.write_text(json.dumps({"format": "codetr-detection-shards", "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        load_index(bad)
    bad.write_text(json.dumps({"format": "codetr-detection-shards", "format_version": 1, "num_samples": 3,
                               "shards": [{"file": "a.tar", "num_samples": 2}], "categories": [],
                               "label_to_category_id": []}))
    with pytest.raises(DataError, match=r"index.json: invalid index file.*3"):
        load_index(bad)


def test_sample_meta_validation():
    ok = dict(image_id=1, file_name="a.jpg", width=10, height=10, boxes=[[0, 0, 5, 5]], category_ids=[3],
              labels=[0], iscrowd=[0], area=[25.0])
    SampleMeta.model_validate(ok)
    with pytest.raises(ValueError, match="labels"):
        SampleMeta.model_validate({**ok, "labels": []})
    with pytest.raises(ValueError, match="outside"):
        SampleMeta.model_validate({**ok, "boxes": [[6, 0, 5, 5]]})
    with pytest.raises(ValueError, match="zero or negative"):
        SampleMeta.model_validate({**ok, "boxes": [[0, 0, 0, 5]]})


# ---------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------


def test_round_trip_boxes_labels_and_bytes(synth_set, synth_json, shard_dir):
    index, root = load_index(shard_dir)
    assert index.num_samples == len(synth_json["images"])
    assert index.shard_sizes == [4, 4, 4, 4, 4, 3, 3]
    assert index.label_to_category_id == [1, 2, 3, 5, 7, 9]
    assert index.source_annotations == "annotations.json"
    assert index.counts.boxes_written == len(synth_json["annotations"])

    # image bytes are copied untouched; keys have no dots
    seen = {}
    for shard in index.shards:
        members = _tar_members(root / shard.file)
        for name, data in members.items():
            key, ext = name.split(".", 1)
            assert "." not in key
            if ext != "json":
                seen[int(key.split("_")[0])] = data
    files = {im["id"]: (synth_set.images_dir / im["file_name"]).read_bytes() for im in synth_json["images"]}
    assert seen == files

    # the loader returns the json boxes (xywh -> xyxy) and the contiguous labels
    cat2label = {cid: i for i, cid in enumerate(index.label_to_category_id)}
    expected = {im["id"]: [] for im in synth_json["images"]}
    for a in synth_json["annotations"]:
        x, y, w, h = a["bbox"]
        expected[a["image_id"]].append(([x, y, x + w, y + h], cat2label[a["category_id"]]))
    sizes = {im["id"]: (im["height"], im["width"]) for im in synth_json["images"]}
    loader = ShardLoader(shard_dir, LoaderOptions(train=False, batch_size=4, rank=0, world_size=1),
                         transform=build_transforms({"kind": "none"}, False))
    got = {}
    for batch in loader:
        for i, iid in enumerate(batch.image_ids):
            t = batch.targets[i]
            got[iid] = [(b, l) for b, l in zip(t.boxes.tolist(), t.labels.tolist())]
            assert tuple(batch.orig_sizes[i].tolist()) == sizes[iid] == tuple(batch.image_sizes[i].tolist())
            assert t.area is not None and t.iscrowd.dtype == torch.bool
    assert got.keys() == expected.keys()
    for iid in expected:
        assert [l for _, l in got[iid]] == [l for _, l in expected[iid]]
        for (gb, _), (eb, _) in zip(got[iid], expected[iid]):
            assert gb == pytest.approx(eb, abs=1e-4)


def test_parallel_writing_gives_identical_shards(synth_set, shard_dir, tmp_path):
    _convert(synth_set.ann_file, synth_set.images_dir, tmp_path, shard_size=4, num_workers=2)
    serial, _ = load_index(shard_dir)
    parallel, _ = load_index(tmp_path)
    assert [s.model_dump() for s in serial.shards] == [s.model_dump() for s in parallel.shards]
    for s in serial.shards:
        assert (shard_dir / s.file).read_bytes() == (tmp_path / s.file).read_bytes()


def test_existing_output_needs_overwrite(synth_set, tmp_path):
    _convert(synth_set.ann_file, synth_set.images_dir, tmp_path, shard_size=10)
    with pytest.raises(DataError, match="overwrite"):
        _convert(synth_set.ann_file, synth_set.images_dir, tmp_path, shard_size=10)
    report = _convert(synth_set.ann_file, synth_set.images_dir, tmp_path, shard_size=20, overwrite=True)
    assert report.num_shards == 2
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*tmp"))


def test_save_index_is_atomic_and_round_trips(shard_dir, tmp_path):
    index, _ = load_index(shard_dir)
    path = save_index(index, tmp_path)
    assert path.name == "index.json" and [p.name for p in tmp_path.iterdir()] == ["index.json"]
    again, _ = load_index(path)
    assert again == index and isinstance(again, DatasetIndex)


# ---------------------------------------------------------------------------------------------
# validation: errors (nothing written) and fixes (counted)
# ---------------------------------------------------------------------------------------------


def test_unknown_category_is_an_error(kit, tmp_path):
    a, d = kit.write_coco(tmp_path, [kit.img(1)], [kit.ann(7, 1, [1, 1, 5, 5], category_id=99)])
    with pytest.raises(DataError) as ei:
        _convert(a, d, tmp_path / "out")
    msg = str(ei.value)
    assert "category ids not in 'categories'" in msg and "ann 7" in msg and "99" in msg and "known ids: 3, 10" in msg
    assert not (tmp_path / "out").exists()


def test_duplicate_image_ids_are_an_error(kit, tmp_path):
    images = [kit.img(1), {**kit.img(1), "file_name": "other.png"}, kit.img(2)]
    a, d = kit.write_coco(tmp_path, images, [])
    with pytest.raises(DataError, match=r"duplicate image ids.*1 \(x2\)"):
        _convert(a, d, tmp_path / "out")


def test_missing_files_are_an_error_listing_them(kit, tmp_path):
    a, d = kit.write_coco(tmp_path, [kit.img(i) for i in range(1, 9)], [], create_files=False)
    kit.write_image(d / "im1.png", 40, 30)
    with pytest.raises(DataError) as ei:
        _convert(a, d, tmp_path / "out")
    msg = str(ei.value)
    assert "7 of 8 image files are missing" in msg and "im2.png" in msg and "(2 more)" in msg


def test_unknown_image_id_and_bad_bbox_are_errors(kit, tmp_path):
    anns = [kit.ann(1, 5, [0, 0, 3, 3]), kit.ann(2, 1, [0, 0, "x", 3]), kit.ann(3, 1, [0, 0, 3])]
    a, d = kit.write_coco(tmp_path, [kit.img(1)], anns)
    with pytest.raises(DataError) as ei:
        _convert(a, d, tmp_path / "out")
    msg = str(ei.value)
    assert "image ids not in 'images'" in msg and "ann 1 -> image_id 5" in msg
    assert "malformed 'bbox'" in msg and "ann 2" in msg and "ann 3" in msg
    assert isinstance(ei.value, ValueError)


def test_duplicate_category_ids_are_an_error(kit, tmp_path):
    a, d = kit.write_coco(tmp_path, [kit.img(1)], [], categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(DataError, match="duplicate category ids"):
        _convert(a, d, tmp_path / "out")


def test_unreadable_json_and_missing_images_dir(kit, tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="cannot parse JSON"):
        _convert(tmp_path / "bad.json", tmp_path / "imgs", tmp_path / "out")
    a, _ = kit.write_coco(tmp_path, [kit.img(1)], [])
    with pytest.raises(DataError, match="images directory not found"):
        _convert(a, tmp_path / "nope", tmp_path / "out")


def test_fixes_are_applied_and_counted(kit, tmp_path):
    images = [kit.img(1, 40, 30), kit.img(2, 40, 30), {"id": 3, "file_name": "im3.png"}]
    anns = [
        kit.ann(1, 1, [-5, -5, 15, 10]),  # clipped -> [0, 0, 10, 5]
        kit.ann(2, 1, [30, 20, 20, 20]),  # clipped -> [30, 20, 10, 10]
        kit.ann(3, 1, [5, 5, 0, 4]),  # zero width: dropped
        kit.ann(4, 1, [5, 5, 4, -1]),  # negative height: dropped
        kit.ann(5, 1, [50, 5, 4, 4]),  # entirely outside: dropped
        kit.ann(6, 1, [2, 2, 6, 6], category_id=10, iscrowd=1, area=11.0),  # crowd: kept, area kept
        kit.ann(7, 3, [0, 0, 4, 4]),
    ]
    a, d = kit.write_coco(tmp_path, images, anns)
    kit.write_image(d / "im3.png", 20, 10)
    report = _convert(a, d, tmp_path / "out")
    c = report.counts
    assert (c.boxes_clipped, c.boxes_dropped_degenerate, c.boxes_dropped_outside) == (2, 2, 1)
    assert (c.boxes_written, c.crowd_boxes, c.images_without_boxes, c.images_written) == (4, 1, 1, 3)
    assert c.image_sizes_read_from_files == 1
    index, root = load_index(tmp_path / "out")
    assert index.counts == c
    metas = {}
    for s in index.shards:
        for name, data in _tar_members(root / s.file).items():
            if name.endswith(".json"):
                m = SampleMeta.model_validate_json(data)
                metas[m.image_id] = m
    assert metas[1].boxes == [(0, 0, 10, 5), (30, 20, 10, 10), (2, 2, 6, 6)]
    assert metas[1].iscrowd == [0, 0, 1] and metas[1].labels == [0, 0, 1] and metas[1].category_ids == [3, 3, 10]
    assert metas[1].area[2] == 11.0 and metas[1].area[0] == 50.0
    assert metas[2].boxes == [] and (metas[3].width, metas[3].height) == (20, 10)
    assert any("dropped 2 zero/negative-size boxes" in w for w in report.warnings)


def test_report_renders(kit, tmp_path):
    from rich.console import Console

    a, d = kit.write_coco(tmp_path, [kit.img(1)], [kit.ann(1, 1, [1, 1, 4, 4])])
    report = _convert(a, d, tmp_path / "out")
    console = Console(record=True, width=120)
    report.render(console)
    text = console.export_text()
    assert "boxes clipped to the image" in text and "class mapping" in text and "dog" in text


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_image_fails_cleanly(kit, tmp_path, num_workers):
    images = [kit.img(i) for i in range(1, 7)]
    a, d = kit.write_coco(tmp_path, images, [])
    (d / "im5.png").write_text("this is not an image")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"im5.png.*not a JPEG/PNG"):
        _convert(a, d, out, shard_size=1, num_workers=num_workers)
    assert list(out.iterdir()) == []  # nothing half-written is left behind
