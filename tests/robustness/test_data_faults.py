"""Data faults reach the user as one clean message, skipped samples are counted, synth never clobbers.

* Every shard / every image unreadable: the loaders raise :class:`DataError` with the same clean,
  one-paragraph message (source, offending file, fix) with ``num_workers`` 0 and 2 -- never torch's
  "Caught DataError in DataLoader worker process" traceback.
* Corrupt samples that are skipped are counted per epoch and in total, with the first offending files
  named (:meth:`DetectionLoader.skip_report`), identically with 0 and 2 workers; the warnings are issued
  in the main process.
* ``codetr data synth --out DIR`` (and ``make_synthetic`` / ``make_synthetic_splits``) refuses a folder
  that holds files it did not write (exit 1, folder named, nothing written or removed) and replaces a
  previous synthetic dataset only with ``--overwrite``.

Every bad input is built on the fly in ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codetr.cli.main import app
from codetr.data.convert import convert_coco
from codetr.data.format import DataError
from codetr.data.loader import build_loader
from codetr.data.synth import SYNTH_MARKER, SynthOutputError, make_synthetic, make_synthetic_splits

runner = CliRunner()
TINY = {"image_format": "png", "min_side": 32, "max_side": 40, "max_objects": 2}
WORKERS = (0, 2)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at 80 columns


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    """6 tiny synthetic images as a COCO folder and as 3 shards of 2 (index.json)."""
    root = tmp_path_factory.mktemp("faults")
    ds = make_synthetic(root / "coco", 6, seed=1, **TINY)
    convert_coco(ds.ann_file, ds.images_dir, root / "shards", shard_size=2, num_workers=0, progress=False,
                 verbose=False)
    return {"coco": root / "coco", "shards": root / "shards"}


def _rewrite_tars(src: Path, dst: Path, damage) -> Path:
    """Copy the shard folder ``src`` to ``dst``, passing every member through ``damage(name, bytes)``."""
    shutil.copytree(src, dst)
    for shard in sorted(dst.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for m, data in members:
                data = damage(shard.name, m.name, data)
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
    return dst


def _shard_src(root: Path, nw: int, **kw) -> dict:
    return {"index": str(root), "batch_size": 2, "num_workers": nw, "transforms": {"kind": "none"}, **kw}


def _coco_src(root: Path, nw: int) -> dict:
    return {"coco": {"ann_file": str(root / "annotations.json"), "images_dir": str(root / "images")},
            "batch_size": 2, "num_workers": nw, "transforms": {"kind": "none"}}


def _iterate(cfg: dict, train: bool) -> tuple[object, list, list[str]]:
    loader = build_loader(cfg, train=train, seed=0, rank=0, world_size=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        batches = list(loader)
    return loader, batches, [str(w.message) for w in rec if "skipped corrupt sample" in str(w.message)]


def _error(cfg: dict, train: bool) -> str:
    loader = build_loader(cfg, train=train, seed=0, rank=0, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError) as info:
            for _ in loader:
                pass
    assert type(info.value) is DataError
    return str(info.value)


def _assert_clean(msg: str, source: Path, fix: str) -> None:
    assert "DataLoader worker" not in msg and "Traceback" not in msg and "\n" not in msg
    assert msg.startswith(f"{source}") and "no usable sample" in msg and fix in msg


# ---------------------------------------------------------------------------------------------
# 1. nothing usable: one clean error, same with and without workers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(clean, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    garbage = root / "garbage"
    shutil.copytree(clean["shards"], garbage)
    for t in garbage.glob("*.tar"):
        t.write_bytes(b"this is not a tar file\n" * 40)
    badimg = _rewrite_tars(clean["shards"], root / "badimg",
                           lambda shard, name, data: data[:24] if name.endswith(".png") else data)
    coco = root / "coco"
    shutil.copytree(clean["coco"], coco)
    for p in (coco / "images").iterdir():
        p.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return {"garbage": garbage, "badimg": badimg, "coco": coco}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["garbage", "badimg"])
def test_unusable_shards_raise_one_clean_error_with_any_workers(broken, kind, train):
    before = _hashes(broken[kind])
    msgs = [_error(_shard_src(broken[kind], nw), train) for nw in WORKERS]
    for msg in msgs:
        _assert_clean(msg, broken[kind], f"codetr data inspect {broken[kind]}")
        assert "codetr data convert" in msg and "shard-00000" in msg
        if kind == "badimg":
            assert "cannot decode image" in msg
        else:
            assert "unreadable tar data" in msg
    assert _hashes(broken[kind]) == before


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_unreadable_coco_images_raise_one_clean_error_with_any_workers(broken, train):
    root = broken["coco"]
    msgs = [_error(_coco_src(root, nw), train) for nw in WORKERS]
    assert msgs[0] == msgs[1]  # identical, whichever process decoded
    _assert_clean(msgs[0], root / "annotations.json", f"codetr data inspect {root / 'annotations.json'}")
    assert "cannot decode image" in msgs[0] and str(root / "images" / "00000") in msgs[0]
    assert "replace or remove the unreadable image files" in msgs[0]


@pytest.mark.parametrize("nw", WORKERS)
def test_worker_data_error_is_raised_cleanly_in_the_main_process(clean, tmp_path, nw):
    """A configuration error inside a worker (a label beyond the index's classes) keeps its message."""
    src = tmp_path / "shards"
    shutil.copytree(clean["shards"], src)
    index = json.loads((src / "index.json").read_text())
    index["categories"] = index["categories"][:1]  # the shards now hold labels >= num_classes
    index["label_to_category_id"] = index["label_to_category_id"][:1]
    (src / "index.json").write_text(json.dumps(index))
    loader = build_loader(_shard_src(src, nw), train=False, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"^.*label \d+ >= num_classes 1; the shards do not match") as info:
        list(loader)
    assert "DataLoader worker" not in str(info.value) and "Traceback" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 2. skipped samples are counted and named, with any number of workers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partly(clean, tmp_path_factory) -> dict[str, Path]:
    """Shards with images 2 and 5 truncated; a COCO folder with image 000003.png unreadable."""
    root = tmp_path_factory.mktemp("partly")
    bad = {"000000000002", "000000000005"}
    shards = _rewrite_tars(clean["shards"], root / "shards",
                           lambda shard, name, data: data[:30] if name[:12] in bad and name.endswith(".png") else data)
    coco = root / "coco"
    shutil.copytree(clean["coco"], coco)
    (coco / "images" / "000003.png").write_bytes(b"garbage")
    one = root / "one"  # a single shard read by both workers (stride 2), its second half cut off
    convert_coco(clean["coco"] / "annotations.json", clean["coco"] / "images", one, shard_size=6, num_workers=0,
                 progress=False, verbose=False)
    (tar,) = one.glob("*.tar")
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    return {"shards": shards, "coco": coco, "one": one}


@pytest.mark.parametrize("nw", WORKERS)
def test_skipped_shard_samples_are_counted_per_epoch_and_named(partly, nw):
    loader, batches, warned = _iterate(_shard_src(partly["shards"], nw), train=False)
    assert len(batches) == len(loader)
    assert sorted(i for b in batches for i in b.image_ids if i >= 0) == [1, 3, 4, 6]
    report = loader.skip_report()
    assert (report.epoch, report.count, report.total) == (0, 2, 2)
    assert loader.num_skipped_epoch == loader.num_skipped == 2
    assert len(report.examples) == 2 and all("cannot decode image" in e for e in report.examples)
    assert sorted(e.split(":")[1][:12] for e in report.examples) == ["000000000002", "000000000005"]
    assert report.message().startswith("2 corrupt samples skipped in epoch 0 (2 since the start): ")
    assert len(warned) == 2  # one warning per sample, issued in the main process

    list(loader)  # epoch 1: the per-epoch count restarts, the total goes on
    report = loader.skip_report()
    assert (report.epoch, report.count, report.total) == (1, 2, 4)


@pytest.mark.parametrize("nw", WORKERS)
def test_skipped_coco_images_are_counted_and_named(partly, nw):
    loader, batches, warned = _iterate(_coco_src(partly["coco"], nw), train=False)
    assert len(batches) == len(loader) == 3
    assert sorted(i for b in batches for i in b.image_ids if i >= 0) == [1, 2, 4, 5, 6]
    report = loader.skip_report()
    assert (report.count, report.total) == (1, 1) and len(warned) == 1
    assert report.examples[0].startswith(f"{partly['coco'] / 'images' / '000003.png'}: cannot decode image")
    assert report.message().startswith("1 corrupt sample skipped in epoch 0 (1 since the start): ")

    train, tb, _ = _iterate(_coco_src(partly["coco"], nw), train=True)
    assert len(tb) == len(train) and train.skip_report().count == 1  # 6 images, batches of 2: once each


def test_a_shard_shared_by_workers_counts_its_tar_error_once(partly):
    counts = {}
    for nw in WORKERS:
        loader, batches, warned = _iterate(_shard_src(partly["one"], nw), train=False)
        assert len(batches) == len(loader) and loader.num_skipped == len(warned)
        counts[nw] = (loader.num_skipped, sorted(i for b in batches for i in b.image_ids if i >= 0))
    assert counts[0] == counts[2] and counts[0][0] >= 1


def test_clean_data_reports_nothing(clean):
    loader, batches, warned = _iterate(_shard_src(clean["shards"], 2), train=True)
    report = loader.skip_report()
    assert not report and report.count == report.total == 0 and report.examples == () and warned == []
    assert report.message() == "no corrupt sample skipped in epoch 0"


# ---------------------------------------------------------------------------------------------
# 3. synth never writes over a file it did not create
# ---------------------------------------------------------------------------------------------


def _synth(out: Path, *extra: str):
    return runner.invoke(app, ["data", "synth", "--out", str(out), "--num-images", "2", "--format", "png", *extra])


def _user_folder(root: Path) -> Path:
    root.mkdir()
    (root / "annotations.json").write_text('{"mine": true}')
    (root / "images").mkdir()
    (root / "images" / "000001.png").write_bytes(b"my own picture")
    (root / "notes.txt").write_text("keep me")
    return root


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--val-images", "1"], ["--val-images", "1", "--overwrite"]])
def test_synth_refuses_a_folder_with_user_files(tmp_path, extra):
    out = _user_folder(tmp_path / "mine")
    before = _hashes(out)
    result = _synth(out, *extra)
    assert result.exit_code == 1, result.output
    text = _flat(result.output)
    assert f"{out} already holds files that `codetr data synth` did not write" in text
    assert "annotations.json" in text and "images/000001.png" in text and "notes.txt" in text
    assert "nothing was written" in text and "Traceback" not in text
    assert _hashes(out) == before and not (out / SYNTH_MARKER).exists()


def test_synth_refuses_a_user_file_inside_a_previous_synth_output(tmp_path):
    out = tmp_path / "syn"
    assert _synth(out).exit_code == 0
    (out / "images" / "extra.png").write_bytes(b"added by the user")
    before = _hashes(out)
    result = _synth(out, "--overwrite")
    assert result.exit_code == 1 and "images/extra.png" in _flat(result.output)
    assert _hashes(out) == before


def test_synth_replaces_its_own_output_only_with_overwrite(tmp_path):
    out = tmp_path / "syn"
    first = _synth(out)
    assert first.exit_code == 0, first.output
    assert (out / "annotations.json").is_file() and not (out / SYNTH_MARKER).exists()  # finished: no marker
    before = _hashes(out)

    again = _synth(out)  # without --overwrite: refused, untouched
    assert again.exit_code == 1
    assert f"{out} already holds a synthetic dataset" in _flat(again.output) and "--overwrite" in again.output
    assert _hashes(out) == before

    replaced = _synth(out, "--overwrite", "--seed", "5", "--shards")
    assert replaced.exit_code == 0, replaced.output
    assert _hashes(out)[str(Path("images") / "000001.png")] != before[str(Path("images") / "000001.png")]
    assert (out / "shards" / "index.json").is_file() and (out / SYNTH_MARKER).is_file()  # claims shards/
    # the shards belong to synth too: a split output may replace the whole folder
    split = _synth(out, "--overwrite", "--val-images", "1")
    assert split.exit_code == 0, split.output
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]


def test_synth_into_an_empty_or_new_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        result = _synth(out, "--val-images", "1")
        assert result.exit_code == 0, result.output
        assert (out / "train" / "annotations.json").is_file() and (out / "val" / "annotations.json").is_file()


def test_synth_refuses_a_file_as_out_and_a_symlink_inside(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = _synth(f)
    assert result.exit_code == 1 and "is not a folder" in _flat(result.output) and f.read_text() == "x"

    out = tmp_path / "syn"
    assert _synth(out).exit_code == 0
    target = tmp_path / "precious.json"
    target.write_text("precious")
    (out / "annotations.json").unlink()
    (out / "annotations.json").symlink_to(target)  # a link where synth writes: never followed
    result = _synth(out, "--overwrite")
    assert result.exit_code == 1 and "annotations.json" in _flat(result.output)
    assert target.read_text() == "precious"


def test_python_api_follows_the_same_rule(tmp_path):
    out = _user_folder(tmp_path / "mine")
    before = _hashes(out)
    for call in (lambda: make_synthetic(out, 1, **TINY), lambda: make_synthetic(out, 1, overwrite=True, **TINY),
                 lambda: make_synthetic_splits(out, 1, 1, **TINY)):
        with pytest.raises(SynthOutputError, match="did not write"):
            call()
    assert _hashes(out) == before
    assert issubclass(SynthOutputError, DataError)

    # val holds a user file: nothing is written to train either
    root = tmp_path / "splits"
    (root / "val").mkdir(parents=True)
    (root / "val" / "mine.txt").write_text("mine")
    with pytest.raises(SynthOutputError, match=r"val/mine\.txt"):
        make_synthetic_splits(root, 1, 1, **TINY)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["val", str(Path("val") / "mine.txt")]

    made = make_synthetic_splits(tmp_path / "ok", 2, 1, **TINY)
    with pytest.raises(SynthOutputError, match="already holds a synthetic dataset"):
        make_synthetic_splits(tmp_path / "ok", 2, 1, **TINY)
    again = make_synthetic_splits(tmp_path / "ok", 1, 1, overwrite=True, **TINY)
    assert again["train"].num_images == 1 and made["train"].ann_file == again["train"].ann_file
    assert sorted(p.name for p in (tmp_path / "ok" / "train" / "images").iterdir()) == ["000001.png"]


def test_a_synth_output_is_recognised_by_its_annotations(tmp_path):
    out = tmp_path / "old"
    make_synthetic(out, 2, **TINY)  # also how older codetr versions left it
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "annotations.json", str(Path("images") / "000001.png"), str(Path("images") / "000002.png")]
    with pytest.raises(SynthOutputError, match="already holds a synthetic dataset"):
        make_synthetic(out, 2, **TINY)
    make_synthetic(out, 3, overwrite=True, **TINY)
    assert len(list((out / "images").iterdir())) == 3


def test_an_interrupted_synth_output_is_still_its_own(tmp_path, monkeypatch):
    import codetr.data.synth as synth

    calls = {"n": 0}
    real = synth._render_image

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(synth, "_render_image", crash_on_second)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(out, 3, **TINY)
    monkeypatch.setattr(synth, "_render_image", real)
    assert not (out / "annotations.json").exists() and (out / SYNTH_MARKER).is_file()
    with pytest.raises(SynthOutputError, match="already holds a synthetic dataset"):
        make_synthetic(out, 3, **TINY)
    assert make_synthetic(out, 3, overwrite=True, **TINY).num_images == 3
