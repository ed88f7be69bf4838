"""Shard statistics, rendered samples and the ``codetr data`` CLI."""

from __future__ import annotations

import json

from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from codetr.data.cli import app
from codetr.data.inspect import inspect_shards, render_samples

runner = CliRunner()


def test_inspect_shards_statistics(shard_dir, synth_json):
    console = Console(record=True, width=140)
    stats = inspect_shards(shard_dir, console=console)
    assert stats.num_samples == 26 and stats.num_boxes == len(synth_json["annotations"])
    assert [s["samples"] for s in stats.shards] == [4, 4, 4, 4, 4, 3, 3] and not stats.mismatches
    assert sum(stats.category_boxes.values()) == stats.num_boxes and stats.num_corrupt == 0
    assert sum(stats.size_buckets.values()) == stats.num_boxes
    text = console.export_text()
    for needle in ("shards", "boxes / image", "categories", "star", "small / medium / large"):
        assert needle in text


def test_inspect_reports_count_mismatch(shard_dir, tmp_path):
    import shutil

    for p in shard_dir.iterdir():
        shutil.copy(p, tmp_path / p.name)
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][0]["num_samples"] = 5
    index["num_samples"] += 1
    (tmp_path / "index.json").write_text(json.dumps(index))
    stats = inspect_shards(tmp_path, show=False)
    assert stats.mismatches == [f"{tmp_path / 'shard-000000.tar'}: index says 5 samples, found 4"]


def test_render_samples(shard_dir, tmp_path):
    paths = render_samples(shard_dir, 3, tmp_path / "plain")
    assert len(paths) == 3 and all(p.exists() for p in paths)
    with Image.open(paths[0]) as im:
        assert im.mode == "RGB"
    aug = render_samples(shard_dir, 2, tmp_path / "aug", transforms={"kind": "lsj", "lsj_image_size": 128})
    with Image.open(aug[0]) as im:
        assert max(im.size) <= 128


def test_cli_synth_convert_inspect(tmp_path):
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "syn"), "--num-images", "5", "--seed", "1",
                                 "--val-images", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "syn" / "train" / "annotations.json").exists()
    assert (tmp_path / "syn" / "val" / "images").is_dir()

    result = runner.invoke(app, ["convert", "--coco", str(tmp_path / "syn" / "train" / "annotations.json"),
                                 "--images", str(tmp_path / "syn" / "train" / "images"), "--out",
                                 str(tmp_path / "shards"), "--shard-size", "2", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "boxes written" in result.output and "class mapping" in result.output
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 3

    result = runner.invoke(app, ["inspect", str(tmp_path / "shards"), "--render", "2", "--out",
                                 str(tmp_path / "render")])
    assert result.exit_code == 0, result.output
    assert "categories" in result.output and len(list((tmp_path / "render").glob("*.png"))) == 2


def test_cli_errors_are_red_one_liners_with_exit_code_1(kit, tmp_path):
    a, d = kit.write_coco(tmp_path, [kit.img(1)], [kit.ann(1, 1, [0, 0, 4, 4], category_id=42)])
    result = runner.invoke(app, ["convert", "--coco", str(a), "--images", str(d), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "error:" in result.output and "category_id 42" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "nothing-here")])
    assert result.exit_code == 1 and "not found" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path), "--render", "1"])
    assert result.exit_code == 1 and "--render needs --out" in result.output


def test_cli_help_texts():
    for args in (["--help"], ["convert", "--help"], ["synth", "--help"], ["inspect", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert "webdataset shards" in runner.invoke(app, ["--help"]).output


def test_inspect_accepts_patterns_and_pipes(shard_dir):
    pattern = str(shard_dir / "shard-{000000..000006}.tar")
    stats = inspect_shards(pattern, show=False)
    assert stats.num_samples == 26 and stats.categories is not None  # index found next to the shards
    pipes = [f"pipe:cat {shard_dir / f'shard-00000{i}.tar'}" for i in range(2)]
    stats = inspect_shards(pipes, show=False)
    assert stats.num_samples == 8 and stats.categories is None


def test_inspect_coco_json_equals_shard_statistics(synth_set, shard_dir, tmp_path):
    from codetr.data.inspect import inspect_coco, is_coco_json

    assert is_coco_json(synth_set.ann_file) and not is_coco_json(shard_dir / "index.json")
    coco = inspect_coco(synth_set.ann_file, synth_set.images_dir, show=False)
    shards = inspect_shards(shard_dir, show=False)
    for field in ("num_samples", "num_boxes", "boxes_per_image", "category_boxes", "category_images",
                  "size_buckets", "image_widths", "crowd_boxes", "images_without_boxes"):
        assert getattr(coco, field) == getattr(shards, field), field

    result = runner.invoke(app, ["inspect", str(synth_set.ann_file), "--images", str(synth_set.images_dir)])
    assert result.exit_code == 0, result.output
    assert "COCO file" in result.output and "categories" in result.output and "boxes / image" in result.output

    # a file the converter would reject: the same readable error, nothing written
    bad = json.loads(synth_set.ann_file.read_text())
    bad["annotations"][0]["category_id"] = 999
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = runner.invoke(app, ["inspect", str(tmp_path / "bad.json"), "--images", str(synth_set.images_dir)])
    assert result.exit_code == 1 and "999" in result.output
    result = runner.invoke(app, ["inspect", str(shard_dir), "--images", str(synth_set.images_dir)])
    assert result.exit_code == 1 and "only applies to a COCO annotation json" in result.output
