"""Transforms keep boxes consistent with the pixels; configs validate; pipelines are seedable."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from codetr.core.structures import Target
from codetr.data.collate import Sample, collate
from codetr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LargeScaleJitter,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    Resize,
    ResizeToFit,
    ToNormalizedTensor,
    TransformsConfig,
    build_transforms,
    denormalize_image,
)


def _target(boxes, labels=None, crowd=None, area=None):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(b)
    return Target(
        boxes=b,
        labels=torch.tensor(labels if labels is not None else list(range(n)), dtype=torch.int64),
        iscrowd=torch.tensor(crowd if crowd is not None else [False] * n, dtype=torch.bool),
        area=torch.tensor(area if area is not None else [float(i + 1) for i in range(n)], dtype=torch.float32),
    )


def _marked_image(w=60, h=40, box=(10, 5, 30, 25)):
    """uint8 (3, h, w) black image with a white rectangle covering ``box`` (xyxy)."""
    t = torch.zeros(3, h, w, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    t[:, y0:y1, x0:x1] = 255
    return t


def _white_extent(img) -> list[float]:
    t = img if isinstance(img, torch.Tensor) else torch.from_numpy(__import__("numpy").array(img)).permute(2, 0, 1)
    ys, xs = torch.nonzero(t[0] > 127, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("as_pil", [False, True])
def test_flip_twice_is_identity_and_moves_boxes(as_pil):
    img = _marked_image()
    if as_pil:
        img = Image.fromarray(img.permute(1, 2, 0).numpy())
    tgt = _target([[10, 5, 30, 25], [0, 0, 60, 40]])
    flip = RandomHorizontalFlip(p=1.0)
    rng = random.Random(0)
    f_img, f_tgt = flip(img, tgt, rng)
    assert f_tgt.boxes[0].tolist() == [30, 5, 50, 25]
    assert _white_extent(f_img) == f_tgt.boxes[0].tolist()
    back_img, back_tgt = flip(f_img, f_tgt, rng)
    assert torch.equal(back_tgt.boxes, tgt.boxes)
    if as_pil:
        assert back_img.tobytes() == img.tobytes()
    else:
        assert torch.equal(back_img, img)
    assert flip.__class__(p=0.0)(img, tgt, rng)[1] is tgt


@pytest.mark.parametrize("as_pil", [False, True])
def test_resize_scales_boxes_with_pixels(as_pil):
    img = _marked_image(60, 40, (12, 8, 36, 24))
    if as_pil:
        img = Image.fromarray(img.permute(1, 2, 0).numpy())
    tgt = _target([[12, 8, 36, 24]])
    out, t = RandomResize([80])(img, tgt, random.Random(0))  # short side 40 -> 80: x2
    assert t.boxes[0].tolist() == [24, 16, 72, 48]
    assert _white_extent(out) == pytest.approx(t.boxes[0].tolist(), abs=1)
    assert torch.equal(t.area, tgt.area)  # area stays in original pixels
    out2, t2 = Resize(80, max_size=100)(img, tgt, random.Random(0))  # long side capped: 60 -> 100
    h2 = out2.height if as_pil else out2.shape[-2]
    assert h2 == 67  # round(40 * 100 / 60); boxes use the actual per-axis scale
    assert t2.boxes[0].tolist() == pytest.approx([20, 8 * 67 / 40, 60, 24 * 67 / 40], abs=1e-4)


def test_resize_to_fit():
    img = torch.zeros(3, 40, 100, dtype=torch.uint8)
    out, t = ResizeToFit((64, 64))(img, _target([[0, 0, 100, 40]]), random.Random(0))
    assert tuple(out.shape[-2:]) == (26, 64) and t.boxes[0].tolist() == pytest.approx([0, 0, 64, 26])  # full-image box -> full output


def test_crop_drops_outside_boxes_and_keeps_fields_aligned():
    img = torch.zeros(3, 100, 100, dtype=torch.uint8)
    tgt = _target(
        [[0, 0, 10, 10], [70, 70, 95, 95], [40, 40, 70, 70], [45, 10, 55, 90], [80, 80, 90, 90]],
        labels=[0, 1, 2, 3, 4],
        crowd=[False, True, True, False, False],
        area=[1.0, 2.0, 3.0, 4.0, 5.0],
    )

    class FixedRng(random.Random):
        def randint(self, a, b):  # crop size is forced to 50x50 (a == b); top = left = 30
            return a if a == b else 30

    out, t = RandomSizeCrop(50, 50)(img, tgt, FixedRng())  # window x, y in [30, 80)
    assert tuple(out.shape[-2:]) == (50, 50)
    assert t.labels.tolist() == [1, 2, 3]  # boxes 0 and 4 are outside the window: dropped
    assert t.iscrowd.tolist() == [True, True, False]
    assert t.area.tolist() == [2.0, 3.0, 4.0]
    assert t.boxes.tolist() == [[40, 40, 50, 50], [10, 10, 40, 40], [15, 0, 25, 50]]


def test_crop_random_keeps_boxes_inside():
    img = torch.zeros(3, 200, 150, dtype=torch.uint8)
    rng = random.Random(3)
    for _ in range(50):
        tgt = _target([[rng.uniform(0, 100), rng.uniform(0, 150), 0, 0] for _ in range(6)])
        tgt.boxes[:, 2:] = tgt.boxes[:, :2] + 30
        out, t = RandomSizeCrop(40, 120)(img, tgt, rng)
        h, w = out.shape[-2:]
        assert 40 <= h <= 120 and 40 <= w <= 120
        assert (t.boxes[:, 0] >= 0).all() and (t.boxes[:, 2] <= w).all() and (t.boxes[:, 3] <= h).all()
        assert ((t.boxes[:, 2] > t.boxes[:, 0]) & (t.boxes[:, 3] > t.boxes[:, 1])).all()
        assert len(t.labels) == len(t.iscrowd) == len(t.area) == len(t.boxes)


def test_lsj_fits_canvas_and_collate_pads_to_it():
    lsj = LargeScaleJitter(128, (0.3, 2.0))
    rng = random.Random(0)
    norm = ToNormalizedTensor()
    samples = []
    for i in range(12):
        img = Image.new("RGB", (90 + 7 * i, 60 + 3 * i), (200, 10, 10))
        tgt = _target([[5, 5, 50, 40], [60, 30, 80, 55]])
        out, t = lsj(img, tgt, rng)
        assert out.height <= 128 and out.width <= 128
        assert (t.boxes[:, 2] <= out.width).all() and (t.boxes[:, 3] <= out.height).all()
        x, t = norm(out, t, rng)
        samples.append(Sample(x, t, i, (60 + 3 * i, 90 + 7 * i)))
    batch = collate(samples, pad_to=lsj.canvas_size)
    assert tuple(batch.images.shape) == (12, 3, 128, 128)
    for i, s in enumerate(samples):
        h, w = s.image.shape[-2:]
        assert batch.image_sizes[i].tolist() == [h, w]
        assert not batch.masks[i, :h, :w].any() and batch.masks[i, h:, :].all() and batch.masks[i, :, w:].all()
    pipe = build_transforms({"kind": "lsj", "lsj_image_size": 128}, train=True)
    assert pipe.canvas_size == (128, 128)
    ev = build_transforms({"kind": "lsj", "lsj_image_size": 128}, train=False)
    x, _ = ev(Image.new("RGB", (300, 100)), _target([]), rng)
    assert tuple(x.shape[-2:]) == (43, 128)


def test_random_select_and_detr_pipeline_keep_boxes_valid():
    cfg = TransformsConfig(kind="detr", scales=[96, 128], max_size=200, crop_resize_scales=[80, 100],
                           crop_size=(50, 90), eval_size=128)
    pipe = build_transforms(cfg, train=True)
    rng = random.Random(1)
    shapes = set()
    for _ in range(30):
        img = Image.new("RGB", (160, 120))
        x, t = pipe(img, _target([[10, 10, 60, 50], [100, 70, 150, 115], [0, 0, 160, 120]]), rng)
        h, w = x.shape[-2:]
        shapes.add((h, w))
        assert x.dtype == torch.float32 and max(h, w) <= 200
        assert (t.boxes[:, 2] <= w + 1e-4).all() and (t.boxes[:, 3] <= h + 1e-4).all() and (t.boxes >= 0).all()
        assert ((t.boxes[:, 2:] > t.boxes[:, :2]).all(dim=1)).all()
    assert len(shapes) > 3
    sel = RandomSelect(Resize(10), Resize(20), p=1.0)
    assert sel(torch.zeros(3, 5, 5, dtype=torch.uint8), _target([]), rng)[0].shape[-1] == 10


def test_pipelines_are_deterministic_given_the_rng():
    pipe = build_transforms({"kind": "detr", "scales": [64, 80, 96], "crop_resize_scales": [60], "crop_size": (30, 50)}, True)
    img = Image.new("RGB", (100, 70), (30, 60, 90))
    tgt = _target([[10, 10, 50, 40]])
    a = pipe(img, tgt, random.Random("seed/3"))
    b = pipe(img, tgt, random.Random("seed/3"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].boxes, b[1].boxes)


def test_normalize_values_and_inverse():
    img = torch.tensor([[[123.675]], [[116.28]], [[103.53]]]).round().to(torch.uint8).expand(3, 2, 2)
    x, _ = ToNormalizedTensor()(img, _target([]), random.Random(0))
    assert x.dtype == torch.float32 and x.abs().max() < 0.01
    pil = Image.new("RGB", (3, 2), (255, 0, 10))
    y, _ = ToNormalizedTensor()(pil, _target([]), random.Random(0))
    assert y[0, 0, 0].item() == pytest.approx((255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0])
    assert denormalize_image(y)[:, 0, 0].tolist() == [255, 0, 10]


def test_config_validation():
    with pytest.raises(ValidationError, match="extra"):
        TransformsConfig(kind="detr", sizes=[1])
    with pytest.raises(ValidationError, match="kind"):
        TransformsConfig(kind="mosaic")
    with pytest.raises(ValidationError, match="crop_size"):
        TransformsConfig(crop_size=(600, 384))
    with pytest.raises(ValidationError, match="scales"):
        TransformsConfig(scales=[])
    with pytest.raises(ValidationError, match="flip_prob"):
        TransformsConfig(flip_prob=1.5)
    none = build_transforms({"kind": "none"}, train=True)
    x, t = none(Image.new("RGB", (33, 17)), _target([[1, 2, 3, 4]]), random.Random(0))
    assert tuple(x.shape) == (3, 17, 33) and t.boxes.tolist() == [[1, 2, 3, 4]]
    ev = build_transforms(TransformsConfig(), train=False)
    x, _ = ev(Image.new("RGB", (1000, 500)), _target([]), random.Random(0))
    assert tuple(x.shape[-2:]) == (667, 1333)  # short 800 capped by max 1333
