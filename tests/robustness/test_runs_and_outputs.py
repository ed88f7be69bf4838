"""Robustness of what codetr writes and reads around a run: earlier runs are never overwritten unasked,
predict never writes over inputs or foreign files, duplicate YAML keys are refused, a resume of another
model says which recipe fields differ, metrics keep one row per iteration, SIGTERM has its own exit code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from codetr.core.config import RecipeError
from codetr.engine.checkpoint import CheckpointError
from codetr.engine.errors import TrainingError
from codetr.engine.trainer import Trainer
from tests.engine.conftest import FakeDetector, make_recipe, quiet_console, recipe_dict

runner = CliRunner()


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _trainer(recipe, out, **kw):
    return Trainer(recipe, output_dir=out, model_factory=lambda cfg: FakeDetector(cfg.num_classes),
                   console=quiet_console(), progress=False, **kw)


# --------------------------------------------------------------------------- earlier runs
def test_fresh_run_into_an_earlier_run_is_refused_then_moved_aside(synth_data, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(synth_data, out, schedule={"iterations": 2})
    _trainer(recipe, out).fit()
    (out / "notes.txt").write_text("mine")  # a user's file in the run folder
    before = _digest(out)
    with pytest.raises(TrainingError) as exc:
        _trainer(recipe, out)
    msg = str(exc.value)
    assert str(out) in msg and "--resume auto" in msg and "--overwrite" in msg and "checkpoints" in msg
    assert _digest(out) == before  # nothing touched
    _trainer(recipe, out, overwrite=True).fit()
    moved = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(moved) == 1
    assert {k.split("/", 1)[1] for k in _digest(out) if k.startswith("replaced-")} == \
        {k for k in before if k != "notes.txt"}  # the whole earlier run, byte for byte
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_train_refuses_and_overwrite_flag(app, synth_data, tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(synth_data, out, schedule={"iterations": 2})))
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    res = runner.invoke(app, ["train", str(path)])
    assert res.exit_code == 1 and "already holds a training run" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", str(path), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert any(p.name.startswith("replaced-") for p in out.iterdir())


def test_preempted_run_exits_75(app, synth_data, tmp_path, monkeypatch):
    from codetr.cli.train_cmd import PREEMPTED_EXIT_CODE
    from codetr.engine.trainer import FitResult

    monkeypatch.setattr(Trainer, "fit", lambda self: FitResult(iteration=1, epoch=0, status="preempted"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(synth_data, tmp_path / "run")))
    res = runner.invoke(app, ["train", str(path)])
    assert res.exit_code == PREEMPTED_EXIT_CODE == 75 and "--resume auto" in res.output.splitlines()[-1]


def test_resume_keeps_one_metrics_row_per_iteration(synth_data, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(synth_data, out, schedule={"iterations": 6},
                         runtime={"checkpoint_period": 2, "keep_last": 10, "log_period": 1})
    _trainer(recipe, out).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    at2 = next(p for p in (out / "checkpoints").glob("*.pt") if torch.load(p, weights_only=False)["iteration"] == 2)
    _trainer(recipe, out, resume=at2).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_resume_from_another_model_names_the_fields(synth_data, tmp_path):
    out = tmp_path / "run"
    _trainer(make_recipe(synth_data, out, schedule={"iterations": 2}), out).fit()
    other = make_recipe(synth_data, out, schedule={"iterations": 4}, model={"num_classes": 3})
    with pytest.raises(CheckpointError) as exc:
        _trainer(other, out, resume="auto")
    msg = str(exc.value)
    assert "different model" in msg and "model.num_classes: 6 -> 3" in msg and "init_from" in msg


# --------------------------------------------------------------------------- predict
def _images(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(p)
        paths.append(p)
    return paths


def _predict_recipe(synth, tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(synth, tmp_path / "run")))
    return path


def test_predict_never_writes_over_inputs_or_foreign_files(app, synth_data, tmp_path):
    recipe = _predict_recipe(synth_data, tmp_path)
    imgs = tmp_path / "imgs"
    _images(imgs)
    Image.new("RGB", (64, 48)).save(imgs / "img0.jpg")  # img0.png would be written over... by img0.jpg's output
    (imgs / "img1.json").write_text('{"mine": true}')  # a user's json of the same stem
    before = _digest(imgs)
    res = runner.invoke(app, ["predict", str(recipe), str(imgs), "--out", str(imgs), "--score-threshold", "0"])
    assert res.exit_code == 1 and "input image" in res.output and "Traceback" not in res.output
    assert _digest(imgs) == before
    out = tmp_path / "preds"
    out.mkdir()
    (out / "img1.json").write_text("user file")
    res = runner.invoke(app, ["predict", str(recipe), str(imgs / "img1.png"), "--out", str(out)])
    assert res.exit_code == 1 and "was not written by codetr predict" in res.output
    assert (out / "img1.json").read_text() == "user file"
    res = runner.invoke(app, ["predict", str(recipe), str(imgs / "img1.png"), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["predict", str(recipe), str(imgs / "img1.png"), "--out", str(out)])
    assert res.exit_code == 0, res.output  # its own earlier outputs may be replaced
    assert _digest(imgs) == before


def test_predict_skips_and_lists_unreadable_files(app, synth_data, tmp_path):
    recipe = _predict_recipe(synth_data, tmp_path)
    imgs = tmp_path / "imgs"
    _images(imgs, 2)
    (imgs / "notes.png").write_text("not an image")
    good = imgs / "img0.png"
    (imgs / "cut.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    out = tmp_path / "preds"
    res = runner.invoke(app, ["predict", str(recipe), str(imgs), "--out", str(out), "--score-threshold", "0"])
    assert res.exit_code == 1 and "2 of 4 input file(s)" in res.output
    assert "notes.png" in res.output and "cut.png" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in out.glob("*.json")) == ["img0.json", "img1.json"]


# --------------------------------------------------------------------------- recipes
def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path):
    from codetr.core.config.loader import parse_override, parse_recipe

    path = tmp_path / "dup.yaml"
    path.write_text("name: x\nmodel:\n  num_queries: 10\n  hidden_dim: 64\n  num_queries: 20\n")
    with pytest.raises(RecipeError) as exc:
        parse_recipe(path)
    assert "duplicate key 'num_queries' (first at line 3, again at line 5)" in str(exc.value)
    with pytest.raises(ValueError, match="duplicate key 'type'"):
        parse_override("model.variant={type: dino, type: x}")
    # YAML merge keys keep their meaning
    assert parse_override("a={<<: {b: 1}, b: 2}")[1] == {"b": 2}


def test_error_messages_keep_brackets(capsys):
    from codetr.cli.common import fail

    fail("bbox must be [x, y, width, height], got [1]")
    assert "[x, y, width, height]" in capsys.readouterr().err


def test_resume_auto_skips_a_truncated_newest_checkpoint(synth_data, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(synth_data, out, schedule={"iterations": 4},
                         runtime={"checkpoint_period": 2, "keep_last": 10})
    _trainer(recipe, out).fit()
    newest = sorted((out / "checkpoints").glob("iter_*.pt"))[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a crash / full disk mid-write of a non-atomic copy
    console = quiet_console()
    t = Trainer(recipe, output_dir=out, resume="auto", model_factory=lambda cfg: FakeDetector(cfg.num_classes),
                console=console, progress=False)
    text = console.file.getvalue()
    assert t.iteration == 2 and newest.name in text and "falling back" in text
    assert newest.is_file()  # kept for the user to look at


def test_output_dir_that_cannot_be_created_is_named(synth_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "run"
    with pytest.raises(TrainingError, match=r"--output-dir .*file/run: cannot create or write the output directory"):
        _trainer(make_recipe(synth_data, out), out)


@pytest.mark.parametrize("entry, needle", [
    ({"image_id": "1", "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}, "image_id='1' is a str, not an integer"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": "0.5"}, "score='0.5' is a str, not a number"),
    ({"image_id": 1, "category_id": "cat", "bbox": [0, 0, 2, 2], "score": 0.5}, "category_id='cat' is a str"),
])
def test_eval_results_type_errors_say_so(entry, needle):
    from codetr.evaluation import EvaluationError, load_coco_annotations, load_coco_results

    gt = load_coco_annotations({"images": [{"id": 1, "width": 10, "height": 10}],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}],
                                "categories": [{"id": 1, "name": "a"}]})
    with pytest.raises(EvaluationError) as exc:
        load_coco_results([entry], gt, "preds.json")
    assert needle in str(exc.value) and "preds.json" in str(exc.value)


def test_single_file_outputs_never_replace_inputs_or_existing_files(tmp_path):
    from codetr.cli.main import app as main_app
    from codetr.engine.checkpoint import base_state, save_checkpoint

    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, base_state(model={"w": torch.ones(2)}))
    before = _digest(tmp_path)
    res = runner.invoke(main_app, ["export-weights", str(ckpt), "--out", str(ckpt)])
    assert res.exit_code == 1 and "is the input" in res.output and _digest(tmp_path) == before
    (tmp_path / "slim.pt").write_text("mine")
    res = runner.invoke(main_app, ["export-weights", str(ckpt), "--out", str(tmp_path / "slim.pt")])
    assert res.exit_code == 1 and "--overwrite" in res.output and (tmp_path / "slim.pt").read_text() == "mine"
    res = runner.invoke(main_app, ["export-weights", str(ckpt), "--out", str(tmp_path / "slim.pt"), "--overwrite"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main_app, ["convert", "recipes/tests/tiny.yaml", str(ckpt), "--out", str(ckpt)])
    assert res.exit_code == 1 and "is the input" in res.output


def test_trainer_reports_skipped_corrupt_samples(tmp_path):
    from types import SimpleNamespace

    from codetr.core.config.schema import Recipe
    from codetr.data.synth import make_synthetic

    root = tmp_path / "data"
    make_synthetic(root, 4, seed=1)
    victim = sorted((root / "images").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated image
    split = SimpleNamespace(ann_file=root / "annotations.json", images_dir=root / "images")
    out = tmp_path / "run"
    recipe = Recipe.model_validate(recipe_dict({"train": split, "val": split}, out, val=False,
                                               schedule={"iterations": 2}))
    console = quiet_console()
    Trainer(recipe, output_dir=out, model_factory=lambda cfg: FakeDetector(cfg.num_classes), console=console,
            progress=False).fit()
    assert victim.name in console.file.getvalue() and "corrupt sample" in console.file.getvalue()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["type"] == "skipped_samples"]
    assert skipped and skipped[0]["count"] >= 1 and victim.name in skipped[0]["examples"][0]


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(synth_data, tmp_path, monkeypatch):
    import errno

    import codetr.engine.checkpoint as ckpt_mod

    out = tmp_path / "run"
    recipe = make_recipe(synth_data, out, schedule={"iterations": 4}, runtime={"checkpoint_period": 2, "keep_last": 5})
    t = _trainer(recipe, out)
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint hits a full disk half-way
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*No space left on device.*intact"):
        t.fit()
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["iter_00000002.pt"]  # no temporary leftovers, the earlier checkpoint untouched
    assert load_checkpoint_ok(out / "checkpoints" / "iter_00000002.pt")


def load_checkpoint_ok(path):
    from codetr.engine.checkpoint import load_checkpoint

    return load_checkpoint(path)["iteration"] == 2
