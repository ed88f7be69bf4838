"""evaluate_predictions_file: every error path names the file, the problem and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from codetr.evaluation import EvaluationError, evaluate_coco_results, evaluate_predictions_file


@pytest.fixture
def files(gt, results, write_json):
    return write_json("preds.json", results), write_json("ann.json", gt)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_happy_path_matches_in_memory(files, gt, results, backend):
    preds, ann = files
    m = evaluate_predictions_file(preds, ann, backend=backend, max_dets=300)
    ref = evaluate_coco_results(results, gt, backend=backend, max_dets=300)
    assert m.stats == ref.stats and m.num_images == 50


def _raises(preds, ann, *fragments):
    with pytest.raises(EvaluationError) as ei:
        evaluate_predictions_file(preds, ann)
    msg = str(ei.value)
    assert "fix:" in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_files(files, tmp_path):
    preds, ann = files
    _raises(tmp_path / "nope.json", ann, "nope.json", "not found")
    _raises(preds, tmp_path / "nope_ann.json", "nope_ann.json", "not found")
    _raises(preds, tmp_path, str(tmp_path), "directory")


def test_invalid_json(files, tmp_path):
    preds, ann = files
    bad = tmp_path / "broken.json"
    bad.write_text('[{"image_id": 1, ')
    _raises(bad, ann, "broken.json", "invalid JSON", "line 1")
    _raises(preds, bad, "broken.json", "invalid JSON")


def test_unknown_image_ids(files, results, write_json):
    _, ann = files
    results[0]["image_id"] = 424242
    results[1]["image_id"] = 434343
    p = write_json("bad_img.json", results)
    _raises(p, ann, "bad_img.json", "2 detection(s)", "image ids not in the annotations", "424242", "434343")


def test_unknown_category_ids(files, results, write_json):
    _, ann = files
    results[0]["category_id"] = 99
    _raises(write_json("bad_cat.json", results), ann, "bad_cat.json", "category ids not in the annotations", "99")


def test_contiguous_label_hint(files, results, write_json):
    _, ann = files
    # labels 0, 2, 6 written instead of category ids 1, 3, 7: off by one
    for r in results:
        r["category_id"] = {1: 0, 3: 2, 7: 6, 12: 11}[r["category_id"]]
    msg = _raises(write_json("labels.json", results), ann, "labels.json")
    assert "off by one" in msg and "label_to_category_id" in msg


def test_malformed_entries(files, results, write_json):
    _, ann = files
    bad = [dict(results[0])]
    del bad[0]["score"]
    _raises(write_json("no_score.json", bad), ann, "no_score.json", "entry [0]", "score")
    bad = [dict(results[0], bbox=[1, 2, 3])]
    _raises(write_json("bbox3.json", bad), ann, "bbox3.json", "not 4 numbers")
    bad = [dict(results[0], bbox=[50, 50, 10, -4])]
    _raises(write_json("neg.json", bad), ann, "neg.json", "negative width/height", "x2 - x1")
    _raises(write_json("notalist.json", {"x": 1}), ann, "notalist.json", "expected a JSON list")
    _raises(write_json("strs.json", ["a"]), ann, "strs.json", "entry [0]")
    p = write_json("nan.json", [dict(results[0], score=float("nan"))])
    _raises(p, ann, "nan.json", "non-finite")


def test_swapped_files(files):
    preds, ann = files
    _raises(ann, preds, str(ann), str(preds), "swapped")
    _raises(ann, ann, str(ann), "*annotation* file, not a results list")


def test_annotations_wrong_shape(files, write_json, gt):
    preds, _ = files
    _raises(preds, write_json("noimages.json", {"annotations": [], "categories": []}), "noimages.json", "'images'")
    _raises(preds, write_json("list.json", [1, 2]), "list.json", "*results* list")
    bad = dict(gt, annotations=[{"image_id": gt["images"][0]["id"], "category_id": 1}])
    _raises(preds, write_json("nobbox.json", bad), "nobbox.json", "annotations[0]")


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_empty_predictions_warns_and_gives_zero(files, write_json, backend):
    _, ann = files
    with pytest.warns(UserWarning, match="empty"):
        m = evaluate_predictions_file(write_json("empty.json", []), ann, backend=backend)
    assert m.stats == [0.0] * 12 and m.num_detections == 0


def test_xyxy_heuristic_warns(files, results, write_json, gt):
    _, ann = files
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    xyxy = []
    for r in results:  # boxes in the right half of the image written as xyxy overshoot the border
        w, h = sizes[r["image_id"]]
        xyxy.append(dict(r, bbox=[w * 0.7, h * 0.7, w * 0.9, h * 0.9]))
    with pytest.warns(UserWarning, match="xyxy"):
        evaluate_predictions_file(write_json("xyxy.json", xyxy), ann)


def test_gt_quirks_are_normalised(files, gt, results, write_json):
    preds, _ = files
    ref = evaluate_predictions_file(preds, write_json("ann_ok.json", gt))
    for i, a in enumerate(gt["annotations"]):
        a["id"] = i  # starts at 0 (Roboflow-style); pycocotools would treat matches to id 0 as misses
        a["ignore"] = 1 - a["iscrowd"]  # stale 'ignore' flags are overridden by iscrowd, as COCO does
    gt["annotations"].append({"id": 10**6, "image_id": -5, "category_id": 1, "bbox": [0, 0, 1, 1],
                              "area": 1, "iscrowd": 0})  # unknown image: ignored with a warning
    with pytest.warns(UserWarning, match="ignored 1 annotation"):
        m = evaluate_predictions_file(preds, write_json("ann_quirks.json", gt))
    assert m.stats == ref.stats
    np.testing.assert_array_equal(m.stats, ref.stats)


def test_missing_area_and_iscrowd_default(gt, results, write_json):
    for a in gt["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3]
    ref = evaluate_coco_results(results, gt)
    for a in gt["annotations"]:
        del a["area"]
    assert evaluate_coco_results(results, gt).stats == ref.stats
    json.dumps(ref.as_dict())  # JSON-serialisable
