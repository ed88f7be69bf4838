"""Deterministic synthetic detection data: coloured shapes on cluttered, textured backgrounds.

``make_synthetic(out_dir, num_images, seed)`` writes a COCO-format dataset::

    out_dir/
        annotations.json     # COCO: images, annotations (bbox xywh absolute pixels), categories
        images/000001.jpg    # or .png

It exists for tests, tutorials and CPU smoke trainings, so it is designed to be learnable but *not
trivial*:

* six classes with non-contiguous COCO ids (like real COCO, exercising the label mapping):
  ``circle`` (1, really an ellipse), ``rectangle`` (2), ``triangle`` (3), ``star`` (5), ``cross`` (7) and
  ``ring`` (9, an elliptic annulus: the background shows through its hole);
* object sizes log-uniform between 10% and 60% of the short image side, aspect ratios log-uniform in
  1/3..3 (every shape is stretched), random rotations (small for rectangles/crosses, any for
  triangles/stars/ellipses), antialiased edges, random colours (sometimes close to the background),
  flat / gradient / striped object textures, some with outlines;
* 1..8 objects per image (about 5% of images have none), up to 25% truncated at the image border,
  overlapping with partial occlusion (every object stays at least ~45% visible);
* textured backgrounds (gradients, smooth colour noise, stripes, checkerboards), clutter lines drawn
  below *and above* the objects, and irregular "blob" distractors that are not objects;
* pixel noise, occasional blur, JPEG compression; image sizes vary in 224..320 px per side (non-square).

Boxes are the **visible extent** of each object (the tight box of its pixels that are not hidden by
later objects or outside the image), ``area`` is its visible pixel count, ``iscrowd`` is 0.

Determinism: image ``i`` depends only on ``(seed, i)`` (``numpy.random.default_rng([seed, i])``), and the
same arguments give byte-identical files on the same numpy/Pillow versions.

Output folders: synth never writes over a file it did not create. The files of a synthetic dataset
are recognised by its ``annotations.json`` (``info.description == "codetr synthetic shapes"``) and the
images it lists; while a run is unfinished a marker, ``.codetr-synth.json``, lists the files it will
write (written first, removed once ``annotations.json`` is written), so an interrupted run is
recognised too; ``codetr data synth --shards`` records the ``shards`` folder in such a marker. An
output folder that holds anything else (any other file, a symlink) is refused with
:class:`SynthOutputError` before anything is written; a previous synthetic dataset is replaced only
with ``overwrite=True`` (``--overwrite``), and then only its own files are removed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from codetr.data.format import DataError

__all__ = ["SYNTH_CATEGORIES", "SYNTH_MARKER", "SynthOutputError", "SyntheticDataset", "make_synthetic",
           "make_synthetic_splits"]

#: Categories of the synthetic set (COCO ids with gaps on purpose).
SYNTH_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 5, "name": "star", "supercategory": "shape"},
    {"id": 7, "name": "cross", "supercategory": "shape"},
    {"id": 9, "name": "ring", "supercategory": "shape"},
)

_SS = 3  # supersampling factor for antialiased shape edges
_MIN_VISIBLE_FRACTION = 0.45  # an existing object must keep this share of its pixels
_MIN_INSIDE_FRACTION = 0.75  # at most 25% of a new object may fall outside the image
_MIN_PIXELS = 24

#: Marker file of an unfinished synth run / of claimed folders: the files synth owns there (module doc).
SYNTH_MARKER = ".codetr-synth.json"
_DESCRIPTION = "codetr synthetic shapes"


@dataclass(frozen=True)
class SyntheticDataset:
    """Where :func:`make_synthetic` wrote a dataset."""

    root: Path
    ann_file: Path
    images_dir: Path
    num_images: int
    num_boxes: int


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _ellipse(n: int = 72) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _shape_polygons(name: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Unit-size polygons of a shape: (filled polygons, holes), before rotation and stretching."""
    if name == "circle":
        return [_ellipse()], []
    if name == "ring":
        inner = rng.uniform(0.45, 0.7)
        return [_ellipse()], [_ellipse() * inner]
    if name == "rectangle":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)], []
    if name == "triangle":
        base = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-25, 25, size=3))
        return [np.stack([np.cos(base), np.sin(base)], axis=1)], []
    if name == "star":
        k = int(rng.choice([5, 5, 6]))
        inner = rng.uniform(0.38, 0.55)
        t = np.arange(2 * k) * math.pi / k
        r = np.where(np.arange(2 * k) % 2 == 0, 1.0, inner)
        return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)], []
    if name == "cross":
        a = rng.uniform(0.22, 0.42)  # half arm thickness
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
        return [np.array(pts, dtype=float)], []
    raise ValueError(f"unknown shape {name!r}")


def _max_rotation(name: str) -> float:
    return {"rectangle": 20.0, "cross": 20.0}.get(name, 180.0)


def _shape_alpha(name: str, box_w: float, box_h: float, rng: np.random.Generator) -> np.ndarray:
    """Antialiased coverage (h, w) float32 in [0, 1] of a shape stretched to fill a ``box_w x box_h`` box."""
    polys, holes = _shape_polygons(name, rng)
    angle = math.radians(rng.uniform(-_max_rotation(name), _max_rotation(name)))
    polys = [_rotate(p, angle) for p in polys]
    holes = [_rotate(p, angle) for p in holes]
    allpts = np.concatenate(polys)
    lo, hi = allpts.min(0), allpts.max(0)
    pw, ph = max(2, int(round(box_w))), max(2, int(round(box_h)))
    scale = np.array([pw * _SS, ph * _SS]) / np.maximum(hi - lo, 1e-6)

    def to_px(p: np.ndarray) -> list[tuple[float, float]]:
        q = (p - lo) * scale
        return [(float(x), float(y)) for x, y in q]

    canvas = Image.new("L", (pw * _SS, ph * _SS), 0)
    draw = ImageDraw.Draw(canvas)
    for p in polys:
        draw.polygon(to_px(p), fill=255)
    for p in holes:
        draw.polygon(to_px(p), fill=0)
    small = canvas.resize((pw, ph), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# appearance
# ----------------------------------------------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _directional(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A (h, w) coordinate along a random direction, in [0, 1]."""
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = xx * math.cos(ang) + yy * math.sin(ang)
    return (d - d.min()) / max(float(d.max() - d.min()), 1e-6)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(0, 4)
    c1, c2 = _random_colour(rng), _random_colour(rng)
    if kind == 0:  # linear gradient
        t = _directional(h, w, rng)[..., None]
        bg = c1 * (1 - t) + c2 * t
    elif kind == 1:  # smooth colour noise
        gh, gw = int(rng.integers(2, 7)), int(rng.integers(2, 7))
        grid = rng.uniform(0, 255, size=(gh, gw, 3)).astype(np.uint8)
        bg = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)
    elif kind == 2:  # stripes
        period = rng.uniform(6, 40)
        t = _directional(h, w, rng) * max(h, w) * 1.5
        s = (0.5 + 0.5 * np.sin(2 * math.pi * t / period))[..., None]
        c2 = c1 + (c2 - c1) * rng.uniform(0.2, 0.8)  # keep stripes from dominating
        bg = c1 * (1 - s) + c2 * s
    else:  # checkerboard
        cell = int(rng.integers(8, 48))
        yy, xx = np.mgrid[0:h, 0:w]
        s = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)[..., None]
        c2 = c1 + (c2 - c1) * rng.uniform(0.15, 0.5)
        bg = c1 * (1 - s) + c2 * s
    bg = bg + rng.normal(0, rng.uniform(2, 12), size=(h, w, 1)) + rng.normal(0, 3, size=(h, w, 3))
    return np.clip(bg, 0, 255).astype(np.float32)


def _object_texture(ph: int, pw: int, rng: np.random.Generator) -> np.ndarray:
    c1 = _random_colour(rng)
    kind = rng.random()
    if kind < 0.55:
        tex = np.broadcast_to(c1, (ph, pw, 3)).astype(np.float32)
    elif kind < 0.8:
        c2 = np.clip(c1 + rng.normal(0, 70, size=3), 0, 255)
        t = _directional(ph, pw, rng)[..., None]
        tex = c1 * (1 - t) + c2 * t
    else:
        c2 = np.clip(c1 + rng.normal(0, 60, size=3), 0, 255)
        period = rng.uniform(4, 12)
        t = _directional(ph, pw, rng) * max(ph, pw)
        s = (np.sin(2 * math.pi * t / period) > 0).astype(np.float32)[..., None]
        tex = c1 * (1 - s) + c2 * s
    tex = tex + rng.normal(0, rng.uniform(1, 8), size=(ph, pw, 1))
    return tex.astype(np.float32)


def _outline(alpha: np.ndarray, width: int) -> np.ndarray:
    """Edge band of a coverage map (for outlined objects)."""
    img = Image.fromarray((alpha * 255).astype(np.uint8))
    eroded = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1)), dtype=np.float32) / 255.0
    return np.clip(alpha - eroded, 0, 1)


def _draw_lines(image: Image.Image, n: int, rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(n):
        pts = [(float(rng.uniform(-0.2, 1.2) * w), float(rng.uniform(-0.2, 1.2) * h)) for _ in range(int(rng.integers(2, 4)))]
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line(pts, fill=colour, width=int(rng.integers(1, 4)))


def _draw_blobs(canvas: np.ndarray, n: int, rng: np.random.Generator) -> None:
    """Irregular polygons (distractors, not objects) composited into ``canvas`` in place."""
    h, w = canvas.shape[:2]
    for _ in range(n):
        k = int(rng.integers(7, 12))
        t = np.sort(rng.uniform(0, 2 * math.pi, size=k))
        r = rng.uniform(0.45, 1.0, size=k)
        size = rng.uniform(0.06, 0.3) * min(h, w)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        pts = [(float(cx + size * ri * math.cos(ti)), float(cy + size * ri * math.sin(ti))) for ri, ti in zip(r, t)]
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).polygon(pts, fill=255)
        a = np.asarray(mask, dtype=np.float32)[..., None] / 255.0 * rng.uniform(0.5, 1.0)
        canvas[:] = canvas * (1 - a) + _random_colour(rng) * a


# ----------------------------------------------------------------------------------------------
# one image
# ----------------------------------------------------------------------------------------------


def _render_image(
    rng: np.random.Generator,
    min_side: int,
    max_side: int,
    max_objects: int,
    empty_prob: float,
    size_range: tuple[float, float],
    aspect_range: tuple[float, float],
) -> tuple[Image.Image, list[tuple[int, list[float], float]]]:
    """Render one image -> (RGB image, [(category index, [x, y, w, h], visible area)])."""
    h, w = int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1))
    canvas = _background(h, w, rng)
    if rng.random() < 0.6:
        _draw_blobs(canvas, int(rng.integers(1, 4)), rng)
    base = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _draw_lines(base, int(rng.integers(0, 9)), rng)
    canvas = np.asarray(base, dtype=np.float32).copy()

    n_objects = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    owner = np.full((h, w), -1, dtype=np.int32)
    drawn: list[int] = []
    classes: list[int] = []
    short = min(h, w)
    log_s = (math.log(size_range[0]), math.log(size_range[1]))
    log_a = (math.log(aspect_range[0]), math.log(aspect_range[1]))
    for _ in range(n_objects):
        for _attempt in range(25):
            cls = int(rng.integers(0, len(SYNTH_CATEGORIES)))
            name = SYNTH_CATEGORIES[cls]["name"]
            s = math.exp(rng.uniform(*log_s)) * short
            ar = math.exp(rng.uniform(*log_a))
            bw = min(s * math.sqrt(ar), 0.95 * w)
            bh = min(s / math.sqrt(ar), 0.95 * h)
            alpha = _shape_alpha(name, bw, bh, rng)
            ph, pw = alpha.shape
            x0 = int(math.floor(rng.uniform(-0.25 * pw, w - 0.75 * pw)))
            y0 = int(math.floor(rng.uniform(-0.25 * ph, h - 0.75 * ph)))
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + pw, w), min(y0 + ph, h)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            a = alpha[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            cand = a > 0.5
            inside, total = int(cand.sum()), int((alpha > 0.5).sum())
            if inside < _MIN_PIXELS or inside < _MIN_INSIDE_FRACTION * total:
                continue
            region = owner[iy0:iy1, ix0:ix1]
            ok = True
            for j, dj in enumerate(drawn):
                covered = int(((region == j) & cand).sum())
                if covered and int((owner == j).sum()) - covered < _MIN_VISIBLE_FRACTION * dj:
                    ok = False
                    break
            if not ok:
                continue
            tex = _object_texture(ph, pw, rng)[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            am = a[..., None]
            patch = canvas[iy0:iy1, ix0:ix1]
            canvas[iy0:iy1, ix0:ix1] = patch * (1 - am) + tex * am
            if rng.random() < 0.25:  # outlined object
                edge = _outline(alpha, int(rng.integers(1, 3)))[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0, None]
                colour = _random_colour(rng)
                canvas[iy0:iy1, ix0:ix1] = canvas[iy0:iy1, ix0:ix1] * (1 - edge) + colour * edge
            region[cand] = len(drawn)
            drawn.append(inside)
            classes.append(cls)
            break

    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    _draw_lines(image, int(rng.integers(0, 4)), rng)  # clutter on top of objects too
    arr = np.asarray(image, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(0, 8), size=arr.shape)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.2))))

    objects: list[tuple[int, list[float], float]] = []
    for k, cls in enumerate(classes):
        ys, xs = np.nonzero(owner == k)
        if len(xs) == 0:  # cannot happen (visibility is enforced), kept for safety
            continue
        x, y = int(xs.min()), int(ys.min())
        objects.append((cls, [float(x), float(y), float(xs.max() + 1 - x), float(ys.max() + 1 - y)], float(len(xs))))
    return image, objects


# ----------------------------------------------------------------------------------------------
# output folders: never write over a file synth did not create
# ----------------------------------------------------------------------------------------------


class SynthOutputError(DataError):
    """The output folder holds files synth did not write, or (without ``overwrite``) a previous
    synthetic dataset. A :class:`~codetr.data.format.DataError`; raised before anything is written."""


def _owned_in(folder: Path) -> set[Path]:
    """Files synth wrote in ``folder``: its ``annotations.json`` (``info.description`` is synth's) and the
    images it lists, plus what a marker lists (an unfinished run's planned files, claimed folders)."""
    owned: set[Path] = set()
    marker = folder / SYNTH_MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
            files, dirs = [str(f) for f in data["files"]], [str(d) for d in data["dirs"]]
        except (OSError, ValueError, KeyError, TypeError):
            files, dirs = [], []  # not ours after all: the marker itself counts as foreign
        else:
            owned.add(marker)
        owned.update(folder / f for f in files)
        for d in dirs:
            owned.update(p for p in (folder / d).rglob("*") if p.is_file() or p.is_symlink())
    ann = folder / "annotations.json"
    if ann.is_file() and not ann.is_symlink():
        try:
            data = json.loads(ann.read_text(encoding="utf-8"))
            if data["info"]["description"] == _DESCRIPTION:
                owned.add(ann)
                owned.update(folder / "images" / str(im["file_name"]) for im in data["images"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return owned


def _scan_output(root: Path) -> tuple[list[Path], list[Path]]:
    """``(owned, foreign)``: files under ``root`` a previous synth run wrote, and everything else
    (files, symlinks, special files; empty folders are neither)."""
    owned: list[Path] = []
    foreign: list[Path] = []
    claimed: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        claimed |= _owned_in(here)
        for name in list(dirnames):
            if (here / name).is_symlink():  # never followed, never ours
                foreign.append(here / name)
                dirnames.remove(name)
        for name in filenames:
            p = here / name
            if p in claimed and p.is_file() and not p.is_symlink():
                owned.append(p)
            else:
                foreign.append(p)
    return sorted(owned), sorted(foreign)


def _prepare_output(root: Path, overwrite: bool) -> None:
    """Check ``root`` (see the module doc) and, with ``overwrite``, remove a previous synthetic dataset.

    Raises:
        SynthOutputError: ``root`` is a file, holds files synth did not write, or holds a previous
            synthetic dataset and ``overwrite`` is false. Nothing is written or removed then.
    """
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise SynthOutputError(f"{root} exists and is not a folder; choose a new or empty folder for the synthetic data")
    if not root.exists():
        return
    owned, foreign = _scan_output(root)
    if foreign:
        names = ", ".join(str(p.relative_to(root)) for p in foreign[:5])
        more = f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else ""
        raise SynthOutputError(
            f"{root} already holds files that `codetr data synth` did not write: {names}{more}; nothing was "
            "written. Choose a new or empty folder (--overwrite only replaces a previous synthetic dataset)."
        )
    if not owned:
        return
    if not overwrite:
        raise SynthOutputError(
            f"{root} already holds a synthetic dataset ({len(owned)} files written by `codetr data synth`); "
            "nothing was written. Pass --overwrite (overwrite=True) to replace it, or choose another folder."
        )
    parents = set()
    for p in owned:
        p.unlink()
        parents.update(q for q in p.parents if q != root and root in q.parents)
    for d in sorted(parents, key=lambda q: len(q.parts), reverse=True):
        try:
            d.rmdir()  # only folders left empty
        except OSError:
            pass


def _write_marker(root: Path, files: Sequence[str], dirs: Sequence[str] = ()) -> None:
    marker = {"written_by": "codetr data synth", "version": 1, "files": list(files), "dirs": list(dirs)}
    (root / SYNTH_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def claim_output_dir(dataset: "SyntheticDataset", name: str) -> Path:
    """Record ``dataset.root / name`` as synth's own in a marker (``codetr data synth --shards`` converts
    into it) and return it; a later synth run with ``overwrite`` may then remove it."""
    files: list[str] = []
    dirs = {name}
    marker = dataset.root / SYNTH_MARKER
    if marker.is_file():
        data = json.loads(marker.read_text(encoding="utf-8"))
        files, dirs = list(data["files"]), dirs | set(data["dirs"])
    _write_marker(dataset.root, files, sorted(dirs))
    return dataset.root / name


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------


def make_synthetic(
    out_dir: str | os.PathLike[str],
    num_images: int,
    seed: int = 0,
    *,
    image_format: Literal["jpg", "png", "mixed"] = "jpg",
    min_side: int = 224,
    max_side: int = 320,
    max_objects: int = 8,
    empty_prob: float = 0.05,
    size_range: tuple[float, float] = (0.10, 0.60),
    aspect_range: tuple[float, float] = (1 / 3, 3.0),
    jpeg_quality: int = 90,
    overwrite: bool = False,
) -> SyntheticDataset:
    """Write ``num_images`` synthetic images + ``annotations.json`` (COCO) under ``out_dir``.

    Args:
        out_dir: output root (``annotations.json`` and ``images/`` are written there). It must be new, empty, or hold a previous synthetic dataset (then only
            with ``overwrite``); see the module doc.
        num_images: number of images (ids ``1..num_images``, files ``images/000001.jpg``...).
        seed: dataset seed; image ``i`` depends only on ``(seed, i)``.
        image_format: ``jpg``, ``png`` or ``mixed`` (odd ids JPEG, even ids PNG).
        min_side, max_side: range of image heights and widths (drawn independently).
        max_objects: objects per non-empty image are drawn uniformly from ``1..max_objects``.
        empty_prob: probability of an image without objects.
        size_range: object size as a fraction of the short image side (log-uniform).
        aspect_range: object width/height ratio range (log-uniform).
        jpeg_quality: JPEG quality.
        overwrite: replace a previous synthetic dataset in ``out_dir`` (files synth did not write are
            never replaced).

    Returns:
        A :class:`SyntheticDataset` with the paths and counts.

    Raises:
        SynthOutputError: ``out_dir`` holds files synth did not write, or a previous synthetic dataset
            without ``overwrite`` (checked before anything is written).
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if not 16 <= min_side <= max_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    if image_format not in ("jpg", "png", "mixed"):
        raise ValueError(f"image_format must be jpg, png or mixed, got {image_format!r}")
    root = Path(out_dir)
    _prepare_output(root, overwrite)

    def ext_of(image_id: int) -> str:
        return {"jpg": "jpg", "png": "png"}.get(image_format) or ("jpg" if image_id % 2 else "png")

    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    planned = ["annotations.json"] + [f"images/{i:06d}.{ext_of(i)}" for i in range(1, num_images + 1)]
    _write_marker(root, planned)  # first: an interrupted run is recognised as ours
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        image_id = i + 1
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i])
        image, objects = _render_image(rng, min_side, max_side, max_objects, empty_prob, size_range, aspect_range)
        ext = ext_of(image_id)
        file_name = f"{image_id:06d}.{ext}"
        if ext == "jpg":
            image.save(images_dir / file_name, format="JPEG", quality=jpeg_quality)
        else:
            image.save(images_dir / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for cls, bbox, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": SYNTH_CATEGORIES[cls]["id"],
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": _DESCRIPTION, "version": "1", "seed": int(seed)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in SYNTH_CATEGORIES],
    }
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps(coco, separators=(",", ":")) + "\n", encoding="utf-8")
    (root / SYNTH_MARKER).unlink()  # complete: annotations.json now says which files are synth's
    return SyntheticDataset(root, ann_file, images_dir, len(images), len(annotations))


def make_synthetic_splits(
    root: str | os.PathLike[str], num_train: int, num_val: int, seed: int = 0, *, overwrite: bool = False,
    **kwargs: Any,
) -> dict[str, SyntheticDataset]:
    """Write ``root/train`` (seed ``seed``) and ``root/val`` (seed ``seed + 1_000_003``), disjoint streams.

    ``root`` as a whole is checked first (the rule of :func:`make_synthetic`, ``overwrite`` included),
    so nothing is written when any part of it holds files synth did not write. Extra keyword arguments
    go to :func:`make_synthetic`.
    """
    root = Path(root)
    _prepare_output(root, overwrite)
    return {
        "train": make_synthetic(root / "train", num_train, seed, **kwargs),
        "val": make_synthetic(root / "val", num_val, seed + 1_000_003, **kwargs),
    }
