"""Both backends summarise identically; maxDets is honoured; per-class AP is a real per-class AP."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from codetr.evaluation import CocoMetrics, evaluate_coco_results, summarize_coco_arrays
from codetr.evaluation import load_coco_annotations
from codetr.evaluation.coco import _run_backend
from tests.evaluation._fixtures import perfect_results

TOL = 1e-12


@pytest.mark.parametrize("max_dets", [100, 300])
def test_backends_identical(gt, results, max_dets):
    fast = evaluate_coco_results(results, gt, backend="faster", max_dets=max_dets)
    ref = evaluate_coco_results(results, gt, backend="pycocotools", max_dets=max_dets)
    assert fast.backend == "faster" and ref.backend == "pycocotools"
    assert fast.max_dets == ref.max_dets == max_dets
    np.testing.assert_allclose(fast.stats, ref.stats, rtol=0, atol=TOL)
    assert 0 < fast.AP < 1 and all(s > 0 for s in fast.stats)  # a meaningful fixture, not all zeros
    assert fast.per_class.keys() == ref.per_class.keys()
    for name in fast.per_class:
        for k in ("AP", "AP50", "AP75", "num_gt", "category_id"):
            assert abs(fast.per_class[name][k] - ref.per_class[name][k]) <= TOL


@pytest.mark.parametrize("max_dets", [100, 300])
def test_backend_arrays_identical(gt, results, max_dets):
    norm = load_coco_annotations(gt)
    dets = [dict(r, id=i + 1, area=r["bbox"][2] * r["bbox"][3], iscrowd=0) for i, r in enumerate(results)]
    ids = [im["id"] for im in norm["images"]]
    a = _run_backend(norm, dets, ids, "faster", max_dets)
    b = _run_backend(norm, dets, ids, "pycocotools", max_dets)
    assert a.max_dets_list == b.max_dets_list == [1, 10, max_dets]
    np.testing.assert_allclose(a.precision, b.precision, rtol=0, atol=TOL)
    np.testing.assert_array_equal(a.recall, b.recall)


def test_max_dets_changes_the_numbers(gt, results):
    m100 = evaluate_coco_results(results, gt, max_dets=100)
    m300 = evaluate_coco_results(results, gt, max_dets=300)
    assert m300.ARmax > m100.ARmax  # low-score true positives beyond the top-100 now count
    assert m300.AR1 == m100.AR1 and m300.AR10 == m100.AR10
    assert "AR300" in m300.as_dict() and "AR100" in m100.as_dict()
    assert any("maxDets=300" in line for line in m300.summary_lines())
    assert not any("maxDets=100" in line for line in m300.summary_lines())


def _native(backend, gt, results, max_dets_list):
    """The backends' own summarize(), for cross-checking our summariser."""
    norm = load_coco_annotations(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval as E
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as E
        g = COCO()
        g.dataset = norm
        g.createIndex()
        d = g.loadRes([dict(r) for r in results])
        e = E(g, d, "bbox")
        e.params.maxDets = max_dets_list
        e.evaluate()
        e.accumulate()
        e.summarize()
    return np.asarray(e.stats[:12], dtype=np.float64)


def test_summary_equals_pycocotools_at_default(gt, results):
    ours = evaluate_coco_results(results, gt, backend="pycocotools", max_dets=100)
    np.testing.assert_allclose(ours.stats, _native("pycocotools", gt, results, [1, 10, 100]), rtol=0, atol=TOL)


def test_summary_at_300_fixes_pycocotools_quirk(gt, results):
    ours = evaluate_coco_results(results, gt, backend="pycocotools", max_dets=300)
    native = _native("pycocotools", gt, results, [1, 10, 300])
    assert native[0] == -1  # pycocotools hard-codes maxDets=100 for stats[0]
    assert ours.AP > 0
    np.testing.assert_allclose(ours.stats[1:], native[1:], rtol=0, atol=TOL)  # the rest use maxDets[2]
    fce = _native("faster", gt, results, [1, 10, 300])  # faster-coco-eval uses maxDets[-1] everywhere
    np.testing.assert_allclose(ours.stats, fce, rtol=0, atol=TOL)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_perfect_predictions_give_one(gt, backend):
    gt["annotations"][0]["id"] = 0  # GT id 0 would be "unmatched" in raw pycocotools; we renumber
    m = evaluate_coco_results(perfect_results(gt), gt, backend=backend, max_dets=100)
    stats = dict(zip(m.stat_names, m.stats))
    assert 0 < stats.pop("AR1") < 1  # several GT per image and category: one detection cannot recall all
    np.testing.assert_allclose(list(stats.values()), 1.0, rtol=0, atol=TOL)
    assert m.per_class["unused"]["AP"] == -1  # no GT: undefined, excluded from the mean
    for name in ("person", "car", "train"):
        assert abs(m.per_class[name]["AP"] - 1) <= TOL


def test_per_class_equals_single_category_evaluation(gt, results):
    m = evaluate_coco_results(results, gt, max_dets=100)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for cid in (1, 3, 7):
        sub_gt = dict(gt, categories=[c for c in gt["categories"] if c["id"] == cid],
                      annotations=[a for a in gt["annotations"] if a["category_id"] == cid])
        sub = evaluate_coco_results([r for r in results if r["category_id"] == cid], sub_gt, max_dets=100)
        row = m.per_class[names[cid]]
        assert abs(row["AP"] - sub.AP) <= TOL
        assert abs(row["AP50"] - sub.AP50) <= TOL
        assert abs(row["AP75"] - sub.AP75) <= TOL
        assert row["num_gt"] == sum(1 for a in sub_gt["annotations"] if not a["iscrowd"])
    # mean of the defined per-class APs == AP (categories without GT excluded)
    aps = [r["AP"] for r in m.per_class.values() if r["AP"] >= 0]
    assert len(aps) == 3 and abs(np.mean(aps) - m.AP) <= TOL


def test_summarize_arrays_all_undefined():
    p = -np.ones((10, 101, 2, 4, 3))
    r = -np.ones((10, 2, 4, 3))
    s = summarize_coco_arrays(p, r, np.linspace(0.5, 0.95, 10), ["all", "small", "medium", "large"], [1, 10, 100], 100)
    assert (s == -1).all()


def test_metrics_rendering(gt, results):
    from rich.console import Console

    m = evaluate_coco_results(results, gt, max_dets=300)
    con = Console(record=True, width=140)
    m.print(console=con)
    text = con.export_text()
    assert "AR300" in text and "maxDets=300" in text and "backend=faster" in text
    assert "person" in text and "—" in text  # the unused category renders as a dash
    d = m.as_dict(prefix="val/")
    assert d["val/max_dets"] == 300 and d["val/backend"] == "faster" and "val/AR300" in d
    assert isinstance(CocoMetrics.from_stats(m.stats), CocoMetrics)


@pytest.mark.parametrize("bad", [0, 5, 9.5, True])
def test_bad_max_dets(gt, results, bad):
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_coco_results(results, gt, max_dets=bad)


def test_bad_backend(gt, results):
    with pytest.raises(ValueError, match="backend"):
        evaluate_coco_results(results, gt, backend="detectron2")


def test_backends_are_quiet(gt, results, capsys):
    for b in ("faster", "pycocotools"):
        evaluate_coco_results(results, gt, backend=b)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
