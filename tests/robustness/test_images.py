"""Nothing the user gave is silently misread: image modes, size mismatches, truncated files.

Every bad input is built on the fly in ``tmp_path``; decoding goes through the one helper every path
uses (:func:`codetr.data.images.decode_rgb`), conversion and inspection through their Python API and
through ``codetr`` CLI (``codetr.cli.main.app``).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from codetr.cli.main import app
from codetr.data.convert import ImageCheckError, convert_coco
from codetr.data.decode import CorruptSampleError, decode_image, decode_rgb, load_image_rgb, parse_shard_sample
from codetr.data.format import DataError, SampleMeta
from codetr.data.inspect import inspect_coco, inspect_shards, iter_shard_samples

runner = CliRunner()
W, H = 64, 4


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    image = decode_rgb(data, "test-image")
    assert image.mode == "RGB"
    arr = np.asarray(image)
    assert arr.dtype == np.uint8 and arr.shape[2] == 3
    return arr


def _grey(v: np.ndarray) -> np.ndarray:
    return np.repeat(v.astype(np.uint8)[:, :, None], 3, axis=2)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _coco(root: Path, files: dict[str, tuple[bytes, int, int]]) -> tuple[Path, Path]:
    """``root/in/ann.json`` + ``root/in/images/<name>``; ``files`` maps name -> (bytes, json w, json h)."""
    images = root / "in" / "images"
    images.mkdir(parents=True)
    entries, anns = [], []
    for i, (name, (data, w, h)) in enumerate(files.items(), start=1):
        (images / name).write_bytes(data)
        entries.append({"id": i, "file_name": name, "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]})
    ann = root / "in" / "ann.json"
    ann.write_text(json.dumps({"images": entries, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return ann, images


def _flat(text: str) -> str:
    return text.replace("\n", "")  # rich wraps long lines (and folds long paths) at 80 columns


def _jpeg(w: int = 48, h: int = 40, seed: int = 0) -> bytes:
    rs = np.random.RandomState(seed)
    return _bytes(Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)), "JPEG", quality=90)


def _truncated_jpeg() -> bytes:
    data = _jpeg(64, 64, seed=1)
    cut = data[: len(data) // 2]
    with Image.open(io.BytesIO(cut)) as im:
        im.verify()  # the header-level check does not notice: a full decode is needed
    return cut


# ---------------------------------------------------------------------------------------------
# every mode decodes to the right 8-bit RGB values
# ---------------------------------------------------------------------------------------------


def test_16bit_png_gradient_is_scaled_not_clipped():
    v16 = np.tile(np.arange(W, dtype=np.uint32) * 1040, (H, 1)).astype(np.uint16)  # 0..65520
    v16[0, -1] = 65535
    v16[1, :3] = (128, 129, 257)  # rounding of v / 257 on both sides of .5
    im = Image.fromarray(v16)
    assert im.mode == "I;16"
    arr = _decode(_bytes(im, "PNG"))
    expected = np.round(v16.astype(np.float64) / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(arr, _grey(expected))
    assert arr[1, :3, 0].tolist() == [0, 1, 1] and arr[0, -1, 0] == 255
    assert (arr < 255).mean() > 0.9  # the old bug: nearly every pixel was clipped to 255


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_containers(fmt):
    v16 = (np.arange(W * H, dtype=np.uint32).reshape(H, W) * 257).astype(np.uint16)  # exact multiples
    arr = _decode(_bytes(Image.fromarray(v16), fmt))
    np.testing.assert_array_equal(arr, _grey((v16 // 257).astype(np.uint8)))


def test_mode_I_32bit_container_holding_16bit_data():
    v = (np.arange(W * H).reshape(H, W) * 257).astype(np.int32)
    im = Image.fromarray(v)
    assert im.mode == "I"
    np.testing.assert_array_equal(_decode(_bytes(im, "TIFF")), _grey(v // 257))


def test_mode_I_without_an_8bit_mapping_raises_naming_file_and_mode():
    im = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32))
    with pytest.raises(CorruptSampleError, match=r"bad\.tif: mode I .*-5\.\.70000"):
        decode_rgb(_bytes(im, "TIFF"), "bad.tif")


def test_float_mode_is_refused_naming_file_and_mode():
    im = Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32))
    assert im.mode == "F"
    with pytest.raises(CorruptSampleError, match=r"depth\.tif: unsupported image mode 'F'"):
        decode_rgb(_bytes(im, "TIFF"), "depth.tif")


def test_grey_L():
    v = np.tile(np.arange(256, dtype=np.uint8), (2, 1))
    np.testing.assert_array_equal(_decode(_bytes(Image.fromarray(v, "L"), "PNG")), _grey(v))


def test_bilevel_1():
    bits = (np.indices((H, W)).sum(0) % 2).astype(bool)
    im = Image.fromarray(bits)
    assert im.mode == "1"
    np.testing.assert_array_equal(_decode(_bytes(im, "PNG")), _grey(bits * 255))


def test_LA_drops_alpha():
    v = np.tile(np.arange(W, dtype=np.uint8) * 4, (H, 1))
    alpha = np.zeros_like(v)
    alpha[:, ::2] = 255
    im = Image.merge("LA", [Image.fromarray(v, "L"), Image.fromarray(alpha, "L")])
    np.testing.assert_array_equal(_decode(_bytes(im, "PNG")), _grey(v))


def test_RGBA_drops_alpha_keeping_stored_colours():
    rs = np.random.RandomState(3)
    rgba = rs.randint(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent pixels keep their stored colour (no compositing on black)
    arr = _decode(_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(arr, rgba[:, :, :3])


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_P(transparent):
    palette = np.random.RandomState(4).randint(0, 256, (256, 3), dtype=np.uint8)
    idx = (np.arange(W * H).reshape(H, W) % 256).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.flatten().tolist())
    kw = {"transparency": 5} if transparent else {}
    data = _bytes(im, "PNG", **kw)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P" and (("transparency" in check.info) == transparent)
    np.testing.assert_array_equal(_decode(data), palette[idx])


def test_cmyk():
    cmyk = np.random.RandomState(5).randint(0, 256, (H, W, 4), dtype=np.uint8)
    cmyk[0, 0] = (0, 0, 0, 0)
    cmyk[0, 1] = (255, 0, 0, 0)
    cmyk[0, 2] = (0, 0, 0, 255)
    arr = _decode(_bytes(Image.fromarray(cmyk, "CMYK"), "TIFF")).astype(np.int32)
    c = cmyk.astype(np.float64)
    expected = (255 - c[:, :, :3]) * (255 - c[:, :, 3:]) / 255
    assert np.abs(arr - expected).max() <= 1
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[0, 1].tolist() == [0, 255, 255]
    assert arr[0, 2].tolist() == [0, 0, 0]


def test_exif_orientation_is_ignored_consistently(tmp_path):
    """Annotations refer to the stored pixel grid: a "rotate 90" EXIF tag does not rotate the pixels."""
    im = Image.fromarray(np.random.RandomState(6).randint(0, 256, (20, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    data = _bytes(im, "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as check:
        assert check.getexif().get(0x0112) == 6
    assert decode_rgb(data, "x.jpg").size == (40, 20)
    ann, images = _coco(tmp_path, {"rot.jpg": (data, 40, 20)})  # stored size: converts fine
    report = convert_coco(ann, images, tmp_path / "out", num_workers=0, progress=False, verbose=False)
    assert report.num_samples == 1 and inspect_coco(ann, images, show=False).ok


def test_every_path_decodes_the_same(tmp_path):
    """convert -> shard -> loader decode, the COCO-folder dataset and predict's reader agree."""
    v16 = np.tile(np.arange(W, dtype=np.uint32) * 1000, (H, 1)).astype(np.uint16)
    data = _bytes(Image.fromarray(v16), "PNG")
    expected = _grey(np.round(v16 / 257.0).astype(np.uint8))
    ann, images = _coco(tmp_path, {"deep.png": (data, W, H)})
    assert inspect_coco(ann, images, show=False).ok
    convert_coco(ann, images, tmp_path / "out", num_workers=0, progress=False, verbose=False)
    raw = next(iter_shard_samples(str(tmp_path / "out" / "shard-000000.tar")))
    meta, member = parse_shard_sample(raw)
    assert member == data  # bytes are copied untouched
    np.testing.assert_array_equal(np.asarray(decode_image(member, meta, "shard")), expected)
    np.testing.assert_array_equal(np.asarray(load_image_rgb(images / "deep.png")), expected)

    from codetr.data.coco_folder import CocoFolderDataset
    from codetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    sample = CocoFolderDataset(ann, images)[0]
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    pixels = np.rint(sample.image.numpy() * std + mean).transpose(1, 2, 0)
    np.testing.assert_array_equal(pixels.astype(np.uint8), expected)


# ---------------------------------------------------------------------------------------------
# size mismatch and truncated JPEG: convert and inspect refuse, name the file, touch no input
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def bad_set(tmp_path):
    """good.jpg (48x40), small.jpg (json says 50x30, real 40x30), cut.jpg (truncated JPEG)."""
    ann, images = _coco(tmp_path, {
        "good.jpg": (_jpeg(), 48, 40),
        "small.jpg": (_bytes(Image.new("RGB", (40, 30), (9, 9, 9)), "JPEG"), 50, 30),
        "cut.jpg": (_truncated_jpeg(), 64, 64),
    })
    return ann, images, _hashes(tmp_path / "in")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_convert_refuses_size_mismatch_and_truncation(bad_set, tmp_path, num_workers):
    ann, images, before = bad_set
    out = tmp_path / "out"
    with pytest.raises(ImageCheckError) as info:
        convert_coco(ann, images, out, shard_size=1, num_workers=num_workers, progress=False, verbose=False)
    msg = str(info.value)
    assert "small.jpg: annotation json says 50x30" in msg and "the image is 40x30" in msg
    assert "cut.jpg" in msg and "truncated" in msg and "good.jpg" not in msg
    assert sorted((p.file.rsplit("/", 1)[-1], p.kind) for p in info.value.problems) == [
        ("cut.jpg", "corrupt"), ("small.jpg", "size")]
    assert isinstance(info.value, DataError)
    assert list(out.iterdir()) == []  # no shard, no index
    assert _hashes(tmp_path / "in") == before


def test_convert_cli_exit_code_and_message(bad_set, tmp_path):
    ann, images, before = bad_set
    result = runner.invoke(app, ["data", "convert", "--coco", str(ann), "--images", str(images), "--out",
                                 str(tmp_path / "out"), "--workers", "0", "--no-progress"])
    text = _flat(result.output)
    assert result.exit_code == 1, result.output
    assert "small.jpg" in text and "50x30" in text and "40x30" in text
    assert "cut.jpg" in text and "truncated" in text and "Traceback" not in text
    assert not (tmp_path / "out" / "index.json").exists()
    assert _hashes(tmp_path / "in") == before


def test_inspect_coco_reports_and_exits_nonzero(bad_set, tmp_path):
    ann, images, before = bad_set
    stats = inspect_coco(ann, images, show=False)
    assert not stats.ok and stats.num_corrupt == 2 and stats.shards[0]["corrupt"] == 2
    joined = " | ".join(stats.problems)
    assert "size mismatch:" in joined and "small.jpg: annotation json says 50x30" in joined and "40x30" in joined
    assert "corrupt:" in joined and "cut.jpg" in joined and "truncated" in joined

    result = runner.invoke(app, ["data", "inspect", str(ann), "--images", str(images)])
    text = _flat(result.output)
    assert result.exit_code == 1, result.output
    assert "small.jpg" in text and "50x30" in text and "cut.jpg" in text and "truncated" in text
    assert "convert would fail" in text
    assert runner.invoke(app, ["data", "inspect", str(ann), "--images", str(images),
                               "--no-check-images"]).exit_code == 0  # annotations alone are fine
    assert _hashes(tmp_path / "in") == before


def test_inspect_shards_decodes_images(tmp_path):
    """A truncated image inside a shard (written by other tools or damaged later) is counted as corrupt."""
    ann, images = _coco(tmp_path, {"a.jpg": (_jpeg(seed=2), 48, 40), "b.jpg": (_jpeg(seed=3), 48, 40)})
    out = tmp_path / "out"
    convert_coco(ann, images, out, num_workers=0, progress=False, verbose=False)
    assert inspect_shards(out, show=False).ok
    shard = out / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name.endswith(".jpg") and m.name.startswith("000000000002"):
                data = data[: len(data) // 2]
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    before = _hashes(out)
    stats = inspect_shards(out, show=False)
    assert stats.num_corrupt == 1 and not stats.ok
    assert "b.jpg" in stats.problems[0] and "truncated" in stats.problems[0]
    assert inspect_shards(out, show=False, check_images=False).num_corrupt == 0

    result = runner.invoke(app, ["data", "inspect", str(out)])
    assert result.exit_code == 1 and "b.jpg" in _flat(result.output), result.output
    assert _hashes(out) == before


def test_decode_image_size_check_names_the_file():
    data = _bytes(Image.new("RGB", (40, 30)), "PNG")
    with pytest.raises(CorruptSampleError, match=r"x\.png: image is 40x30 but its annotations say 50x30"):
        decode_image(data, SampleMeta(image_id=1, file_name="x.png", width=50, height=30), "x.png")


def test_predict_style_reader_raises_a_value_error_naming_the_file(tmp_path):
    """``load_image_rgb`` is what predict uses: its error is a ValueError naming the file."""
    path = tmp_path / "cut.jpg"
    path.write_bytes(_truncated_jpeg())
    with pytest.raises(ValueError, match=r"cut\.jpg: cannot decode image .*truncated"):
        load_image_rgb(path)
