"""``codetr train|eval|predict`` commands, predict_images and the drawing helpers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from codetr.core.structures import Detections, Target
from codetr.engine.visualize import class_color, draw_detections, draw_side_by_side

from .conftest import FakeDetector, make_recipe, quiet_console, recipe_dict


def _write_recipe(synth, tmp_path, **kw):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(synth, tmp_path / "run", **kw)))
    return path


def test_cli_train_resume_eval_predict(app, synth_data, tmp_path):
    runner = CliRunner()
    recipe = _write_recipe(synth_data, tmp_path, schedule={"iterations": 2})
    res = runner.invoke(app, ["train", str(recipe), "--set", "schedule.iterations=3", "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    ckpts = tmp_path / "out" / "checkpoints"
    assert (ckpts / "iter_00000003.pt").is_file() and (ckpts / "model_final.pt").is_file()
    res = runner.invoke(app, ["train", str(recipe), "--set", "schedule.iterations=3", "--output-dir",
                              str(tmp_path / "out"), "--resume", "auto"])
    assert res.exit_code == 0 and "nothing to do" in res.output

    res = runner.invoke(app, ["eval", str(recipe), "--checkpoint", str(ckpts / "model_final.pt"), "--max-dets", "10"])
    assert res.exit_code == 0, res.output
    assert "maxDets=10" in res.output and "Average Precision" in res.output

    img = synth_data["val"].images_dir
    res = runner.invoke(app, ["predict", str(recipe), str(img), "--checkpoint", str(ckpts / "model_final.pt"),
                              "--out", str(tmp_path / "preds"), "--score-threshold", "0"])
    assert res.exit_code == 0, res.output
    jsons = sorted((tmp_path / "preds").glob("*.json"))
    assert len(jsons) == 6 and len(list((tmp_path / "preds").glob("*.png"))) == 6
    payload = json.loads(jsons[0].read_text())
    det = payload["detections"][0]
    assert set(det) == {"bbox_xyxy", "score", "label", "category_id", "category_name"}
    assert det["category_name"] in {"circle", "rectangle", "triangle", "star", "cross", "ring"}  # from the checkpoint
    assert payload["width"] == Image.open(payload["image"]).width


def test_cli_errors_are_red_messages_without_traceback(app, synth_data, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 1 and "error" in res.output and "Traceback" not in res.output
    recipe = _write_recipe(synth_data, tmp_path)
    res = runner.invoke(app, ["train", str(recipe), "--resume", str(tmp_path / "missing.pt")])
    assert res.exit_code == 1 and "no such checkpoint" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", "--predictions", str(tmp_path / "p.json")])
    assert res.exit_code == 1 and "go together" in res.output
    res = runner.invoke(app, ["eval"])
    assert res.exit_code == 1 and "missing recipe" in res.output


def test_cli_eval_delegates_to_predictions_file_mode(app, synth_data, tmp_path):
    ann = json.loads(synth_data["val"].ann_file.read_text())
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in ann["annotations"]]
    (tmp_path / "p.json").write_text(json.dumps(preds))
    res = CliRunner().invoke(app, ["eval", "--predictions", str(tmp_path / "p.json"), "--annotations",
                                   str(synth_data["val"].ann_file), "--backend", "pycocotools"])
    assert res.exit_code == 0, res.output
    assert "backend=pycocotools" in res.output and "1.000" in res.output


def test_predict_images_api(synth_data, tmp_path):
    from codetr.engine.predict import predict_images

    recipe = make_recipe(synth_data, tmp_path / "run")
    files = sorted(synth_data["val"].images_dir.iterdir())[:2]
    out = predict_images(recipe, None, files, tmp_path / "p", score_threshold=0.0,
                         model_factory=lambda cfg: FakeDetector(cfg.num_classes), console=quiet_console())
    assert len(out) == 2 and out[0]["num_detections"] == 3
    w, h = out[0]["width"], out[0]["height"]
    b = out[0]["detections"][0]["bbox_xyxy"]
    assert -w <= b[0] <= b[2] <= 2 * w and -h <= b[1] <= b[3] <= 2 * h  # original-pixel frame
    with pytest.raises(FileNotFoundError):
        predict_images(recipe, None, [tmp_path / "nope.jpg"], tmp_path / "p", model_factory=lambda c: FakeDetector())


def test_drawing_helpers(tmp_path):
    image = Image.new("RGB", (64, 48), (30, 30, 30))
    dets = Detections(torch.tensor([[4.0, 4.0, 30.0, 40.0], [10.0, 10.0, 60.0, 20.0]]), torch.tensor([0.9, 0.2]),
                      torch.tensor([0, 2]))
    drawn = draw_detections(image, dets, ["a", "b", "c"], score_threshold=0.5)
    assert drawn.size == image.size and drawn.getpixel((4, 20)) == class_color(0)
    assert drawn.getpixel((60, 15)) == (30, 30, 30)  # below the threshold: not drawn
    assert len({class_color(i) for i in range(20)}) == 20
    gt = Target(torch.tensor([[5.0, 5.0, 30.0, 30.0]]), torch.tensor([1]), torch.tensor([False]))
    pic = draw_side_by_side(torch.rand(3, 48, 64), gt, dets, ["a", "b", "c"], tmp_path / "sbs.png")
    assert (tmp_path / "sbs.png").is_file() and pic.width > 2 * 64
