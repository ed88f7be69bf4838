"""CocoEvaluator: label mapping, Detections -> results, dedup, DDP gather, streaming GT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import codetr.evaluation.coco as coco_mod
from codetr.core.structures import Detections
from codetr.evaluation import CocoEvaluator, EvaluationError, coco_gt_from_targets, evaluate_coco_results
from tests.evaluation._fixtures import LABEL_TO_CAT, gt_to_targets, perfect_results, results_to_detections

TOL = 1e-12

# the fixture has dense images (>100 detections) on purpose; that warning has its own test
pytestmark = pytest.mark.filterwarnings("ignore:image .* detections > max_dets:UserWarning")


def _ids(gt):
    return [im["id"] for im in gt["images"]]


def _feed(ev, gt, results, batch=4, label_to_cat=LABEL_TO_CAT):
    ids = _ids(gt)
    dets = results_to_detections(results, ids, label_to_cat)
    for s in range(0, len(ids), batch):
        ev.update(ids[s:s + batch], dets[s:s + batch])
    return ev


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
@pytest.mark.parametrize("max_dets", [100, 300])
def test_evaluator_equals_results_file_path(gt, results, backend, max_dets):
    ev = _feed(CocoEvaluator(gt, LABEL_TO_CAT, backend=backend, max_dets=max_dets), gt, results)
    m = ev.compute()
    ref = evaluate_coco_results(results, gt, backend=backend, max_dets=max_dets)
    assert m.stats == ref.stats  # exact: coordinates are float32-exact
    assert m.per_class == ref.per_class
    assert m.num_images == len(gt["images"]) and m.num_detections == len(results)


def test_label_mapping_non_contiguous(gt):
    ev = _feed(CocoEvaluator(gt, [1, 3, 7, 12]), gt, perfect_results(gt))
    assert abs(ev.compute().AP - 1) <= TOL
    # results are written with the original category ids
    assert {r["category_id"] for r in ev.to_coco_results()} == {1, 3, 7}
    # None = sorted category ids, here the same mapping
    ev2 = _feed(CocoEvaluator(gt, None), gt, perfect_results(gt))
    assert ev2.label_to_category_id == [1, 3, 7, 12] and ev2.compute().stats == ev.compute().stats
    # a wrong mapping (labels used as ids) is detected as a different (worse) result, not silently equal
    rotated = [3, 7, 1, 12]
    ev3 = _feed(CocoEvaluator(gt, rotated), gt, perfect_results(gt), label_to_cat=LABEL_TO_CAT)
    assert ev3.compute().AP < 0.5


def test_label_mapping_validation(gt):
    with pytest.raises(EvaluationError, match="not in the annotations"):
        CocoEvaluator(gt, [0, 1, 2, 3])
    with pytest.raises(EvaluationError, match="same category"):
        CocoEvaluator(gt, [1, 1, 3, 7])
    ev = CocoEvaluator(gt, [1, 3, 7, 12])
    bad = Detections(torch.zeros(1, 4), torch.ones(1), torch.tensor([4]))  # label == num_classes (background)
    with pytest.raises(EvaluationError, match=r"outside \[0, 4\)"):
        ev.update([gt["images"][0]["id"]], [bad])
    with pytest.raises(EvaluationError, match="not in the annotations"):
        ev.update([123456789], [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))])
    with pytest.raises(ValueError, match="image ids"):
        ev.update([1, 2], [bad])
    with pytest.raises(EvaluationError, match="no image"):
        CocoEvaluator(gt).compute()


def _empty():
    return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_no_detections_at_all(gt, backend):
    ev = CocoEvaluator(gt, backend=backend)
    ev.update(_ids(gt), [_empty() for _ in gt["images"]])
    m = ev.compute()
    assert m.stats == [0.0] * 12 and m.num_detections == 0
    assert m.per_class["person"]["AP"] == 0 and m.per_class["unused"]["AP"] == -1


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_only_images_without_gt(gt, results, backend):
    no_gt = [im["id"] for im in gt["images"] if not any(a["image_id"] == im["id"] for a in gt["annotations"])]
    assert len(no_gt) >= 5
    ev = CocoEvaluator(gt, backend=backend)
    ev.update(no_gt, results_to_detections(results, no_gt))
    with pytest.warns(UserWarning, match="of the 50 annotated images"):
        m = ev.compute()
    assert m.stats == [-1.0] * 12  # nothing defined; rendered as "—"
    from rich.console import Console

    con = Console(record=True, width=140)
    con.print(m.to_table())
    assert con.export_text().count("—") >= 12 + 4 * 3


def test_duplicates_within_a_rank_keep_first(gt, results):
    ids = _ids(gt)
    ref = _feed(CocoEvaluator(gt), gt, results).compute()
    ev = _feed(CocoEvaluator(gt), gt, results)
    # padding at the end of the stream: the same images again, with garbage detections
    garbage = [Detections(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.ones(1), torch.zeros(1, dtype=torch.int64))] * 3
    ev.update(ids[:3], garbage)
    assert ev.num_duplicates == 3 and ev.num_images == len(ids)
    assert ev.compute().stats == ref.stats


def test_padding_ids_are_skipped(gt, results):
    ids = _ids(gt)
    dets = results_to_detections(results, ids)
    ref = CocoEvaluator(gt)
    ref.update(ids, dets)
    ev = CocoEvaluator(gt)
    ev.update(ids + [-1, -1], dets + dets[:2])  # codetr.data.collate.PADDING_IMAGE_ID == -1
    assert ev.num_padding == 2 and ev.num_images == len(ids)
    assert ev.compute().stats == ref.compute().stats
    samples = gt_to_targets(gt)
    pad = [(-1,) + tuple(samples[0][1:])]
    assert coco_gt_from_targets(samples + pad, LABEL_TO_CAT, gt["categories"]) == \
        coco_gt_from_targets(samples, LABEL_TO_CAT, gt["categories"])


def test_synchronize_gathers_and_dedups(gt, results, monkeypatch):
    """Simulated 2-rank gather: rank 1 pads with a duplicate of an image rank 0 already evaluated."""
    ids = _ids(gt)
    dets = results_to_detections(results, ids)
    ref = CocoEvaluator(gt)
    ref.update(ids, dets)
    ref_m = ref.compute()

    rank0, rank1 = CocoEvaluator(gt), CocoEvaluator(gt)
    rank0.update(ids[0::2], dets[0::2])
    rank1.update(ids[1::2] + [ids[0]], dets[1::2] + [_empty()])  # padding sample: duplicate of ids[0]

    def fake_all_gather_object(out, obj):
        out[0] = (rank0._preds, rank0._targets)
        out[1] = obj

    monkeypatch.setattr(coco_mod, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", fake_all_gather_object)
    with pytest.warns(UserWarning, match="without synchronize"), pytest.warns(UserWarning, match="26 of the 50"):
        partial = rank1.compute()
    assert partial.num_images == len(ids[1::2]) + 1
    rank1.synchronize()
    assert rank1.num_images == len(ids) and rank1.num_duplicates == 1
    assert rank1.compute().stats == ref_m.stats


def test_synchronize_without_process_group_is_noop(gt, results):
    ev = _feed(CocoEvaluator(gt), gt, results)
    before = ev.compute().stats
    ev.synchronize()
    assert ev.compute().stats == before


def test_nonfinite_detections_are_dropped(gt, results):
    ids = _ids(gt)
    dets = results_to_detections(results, ids)
    ref = CocoEvaluator(gt)
    ref.update(ids, dets)
    d0 = dets[0]
    nan = Detections(torch.cat([d0.boxes, torch.full((1, 4), float("nan"))]), torch.cat([d0.scores, torch.ones(1)]),
                     torch.cat([d0.labels, torch.zeros(1, dtype=torch.int64)]))
    ev = CocoEvaluator(gt)
    ev.update(ids, [nan] + dets[1:])
    with pytest.warns(UserWarning, match="NaN/inf"):
        m = ev.compute()
    assert m.stats == ref.compute().stats


@pytest.mark.parametrize("max_dets", [100, 300])
def test_gt_from_targets_equals_json(gt, results, max_dets):
    samples = gt_to_targets(gt)
    mem = coco_gt_from_targets(samples + samples[:3], LABEL_TO_CAT, gt["categories"])  # padded stream
    assert len(mem["images"]) == len(gt["images"]) and len(mem["annotations"]) == len(gt["annotations"])
    a = evaluate_coco_results(results, gt, max_dets=max_dets)
    b = evaluate_coco_results(results, mem, max_dets=max_dets)
    assert a.stats == b.stats and a.per_class == b.per_class
    # categories may also be given as one name per label
    names = coco_gt_from_targets(samples, LABEL_TO_CAT, [c["name"] for c in gt["categories"]])
    assert names["categories"] == mem["categories"]


def test_gt_from_targets_area_none_uses_box_area(gt):
    samples = [(i, w, h, type(t)(t.boxes, t.labels, t.iscrowd, None)) for i, w, h, t in gt_to_targets(gt)]
    mem = coco_gt_from_targets(samples, LABEL_TO_CAT, gt["categories"])
    for a in mem["annotations"]:
        assert a["area"] == a["bbox"][2] * a["bbox"][3]


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_streaming_gt_evaluator(gt, results, backend):
    samples = gt_to_targets(gt)
    ev = CocoEvaluator(None, LABEL_TO_CAT, backend=backend, max_dets=300, categories=gt["categories"])
    ids = _ids(gt)
    dets = results_to_detections(results, ids)
    for s in range(0, len(ids), 8):
        chunk = samples[s:s + 8]
        ev.add_targets([c[0] for c in chunk], [(c[1], c[2]) for c in chunk], [c[3] for c in chunk])
        ev.update(ids[s:s + 8], dets[s:s + 8])
    m = ev.compute()
    ref = evaluate_coco_results(results, gt, backend=backend, max_dets=300)
    assert m.stats == ref.stats and m.per_class == ref.per_class

    ev2 = CocoEvaluator(None, LABEL_TO_CAT, categories=gt["categories"])
    ev2.update(ids[:2], dets[:2])
    with pytest.raises(EvaluationError, match="no ground truth"):
        ev2.compute()
    with pytest.raises(ValueError, match="categories"):
        CocoEvaluator(None, LABEL_TO_CAT)
    with pytest.raises(RuntimeError, match="streaming"):
        CocoEvaluator(gt).add_targets([], [], [])


def test_too_many_detections_warns(gt):
    ev = CocoEvaluator(gt, max_dets=100)
    n = 150
    d = Detections(torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(n, 1), torch.rand(n), torch.zeros(n, dtype=torch.int64))
    with pytest.warns(UserWarning, match="max_dets=100"):
        ev.update([gt["images"][0]["id"]], [d])


def test_image_ids_as_tensor_and_gpu_like_inputs(gt, results):
    ids = _ids(gt)
    dets = results_to_detections(results, ids)
    ev = CocoEvaluator(gt)
    ev.update(torch.tensor(ids), dets)
    assert ev.num_images == len(ids)
    np.testing.assert_array_equal(sorted(ev._preds), sorted(ids))
