"""Look at data: shard statistics (:func:`inspect_shards`), the same statistics for a COCO json before
conversion (:func:`inspect_coco`) and rendered samples (:func:`render_samples`).

Both accept an ``index.json``, a directory holding one, or shard URLs/patterns. Statistics are computed
from the per-sample annotations; the sample counts found in the shards are compared with the index, and
mismatches are shown in red. Unless ``check_images=False``, every image is also decoded exactly as
training decodes it (:func:`codetr.data.images.decode_rgb`: truncated or undecodable files and
unsupported modes are corrupt) and its real size compared with its annotations; each offender is named
in :attr:`ShardStats.problems` and counted in ``num_corrupt``. :attr:`ShardStats.ok` is what the CLI's
exit status follows.
"""

from __future__ import annotations

import colorsys
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from codetr.data.decode import CorruptSampleError, decode_image, meta_to_target, parse_shard_sample
from codetr.data.format import CategoryInfo, SampleMeta, load_index
from codetr.data.images import ImageProblem, check_image
from codetr.data.tables import key_value_table
from codetr.data.transforms import TransformsConfig, build_transforms

_MAX_PROBLEMS_SHOWN = 50

__all__ = ["ShardStats", "inspect_shards", "inspect_coco", "is_coco_json", "render_samples", "iter_shard_samples"]


@dataclass
class ShardStats:
    """Statistics of a set of shards (what :func:`inspect_shards` prints).

    Box sizes use the stored COCO boxes (xywh pixels of the original images); the small/medium/large
    split uses COCO ``area`` with the COCO thresholds (32², 96²).
    """

    shards: list[dict[str, Any]] = field(default_factory=list)  # url, samples, declared, boxes, corrupt
    num_samples: int = 0
    num_boxes: int = 0
    num_corrupt: int = 0
    images_without_boxes: int = 0
    boxes_per_image: list[int] = field(default_factory=list)
    category_boxes: dict[int, int] = field(default_factory=dict)  # label -> boxes
    category_images: dict[int, int] = field(default_factory=dict)  # label -> images containing it
    crowd_boxes: int = 0
    size_buckets: dict[str, int] = field(default_factory=lambda: {"small": 0, "medium": 0, "large": 0})
    relative_sizes: list[float] = field(default_factory=list)  # sqrt(box area / image area)
    aspect_ratios: list[float] = field(default_factory=list)  # w / h
    image_widths: list[int] = field(default_factory=list)
    image_heights: list[int] = field(default_factory=list)
    categories: list[CategoryInfo] | None = None
    mismatches: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "<kind>: <file or shard:key (file)>: why", per sample

    @property
    def ok(self) -> bool:
        """No corrupt sample, no image/size problem and no index count mismatch."""
        return not (self.num_corrupt or self.problems or self.mismatches)


def _resolve(source: str | os.PathLike[str] | Sequence[str]) -> tuple[list[str], list[int] | None, list[CategoryInfo] | None]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir() or p.suffix == ".json":
            index, root = load_index(p)
            return index.shard_urls(root), index.shard_sizes, list(index.categories)
    from codetr.data.shards import resolve_shards

    shard_set = resolve_shards(source, require_count=False)  # validates local paths
    cats = list(shard_set.info.categories) if shard_set.info.categories is not None else None
    return list(shard_set.urls), (list(shard_set.sizes) if shard_set.sizes else None), cats


def iter_shard_samples(url: str, errors: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples of one shard; read errors are appended to ``errors`` (skipped)."""
    from webdataset.tariterators import tarfile_samples

    def handler(exn: Exception) -> bool:
        if errors is not None:
            errors.append(f"{type(exn).__name__}: {exn}")
        return True

    yield from tarfile_samples(iter([{"url": url}]), handler=handler)


def _quantiles(values: Sequence[float]) -> str:
    if not values:
        return "-"
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.05, 0.25, 0.5, 0.75, 0.95])
    return " / ".join(f"{v:.3g}" for v in q)


def inspect_shards(
    source: str | os.PathLike[str] | Sequence[str],
    *,
    console: Any | None = None,
    max_shards: int | None = None,
    show: bool = True,
    check_images: bool = True,
) -> ShardStats:
    """Read the annotations of every sample and print shard/index statistics as rich tables.

    Args:
        source: ``index.json``, its directory, or shard URLs/patterns.
        console: rich console (default: a new one on stdout).
        max_shards: only read the first N shards (quick look at huge sets).
        show: print the tables (``False``: just return the statistics).
        check_images: also decode every image as training does and compare its size with its
            annotations (corrupt ones are counted and named in ``problems``); ``False``: annotations only.

    Returns:
        The :class:`ShardStats`.
    """
    urls, declared, categories = _resolve(source)
    stats = ShardStats(categories=categories)
    for k, url in enumerate(urls[:max_shards] if max_shards else urls):
        errors: list[str] = []
        n = boxes = corrupt = 0
        for raw in iter_shard_samples(url, errors):
            try:
                meta, data = parse_shard_sample(raw)
            except CorruptSampleError as exc:
                corrupt += 1
                stats.problems.append(f"corrupt: {exc}")
                continue
            if check_images:
                problem = check_image(data, f"{url}:{raw.get('__key__')} ({meta.file_name})", meta.width, meta.height)
                if problem is not None:
                    corrupt += 1
                    stats.problems.append(_describe(problem))
            n += 1
            boxes += meta.num_boxes
            _accumulate(stats, meta)
        corrupt += len(errors)  # tar-level read errors
        stats.problems.extend(f"read error: {url}: {e}" for e in errors)
        want = declared[k] if declared is not None else None
        if want is not None and want != n:
            stats.mismatches.append(f"{url}: index says {want} samples, found {n}")
        stats.shards.append({"url": url, "samples": n, "declared": want, "boxes": boxes, "corrupt": corrupt})
        stats.num_corrupt += corrupt
    if show:
        _print(stats, console)
    return stats


def is_coco_json(path: str | os.PathLike[str]) -> bool:
    """True for a COCO annotation file (top-level ``images`` and ``annotations``), False for an index.json."""
    p = Path(path)
    if p.suffix != ".json" or not p.is_file():
        return False
    with p.open("rb") as fh:
        head = fh.read(1 << 16)
    return (b'"annotations"' in head or b'"images"' in head) and b'"shards"' not in head


def inspect_coco(
    ann_file: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    *,
    console: Any | None = None,
    show: bool = True,
    check_images: bool = True,
    num_threads: int | None = None,
) -> ShardStats:
    """Validate a COCO detection file as ``codetr data convert`` would and print the shard statistics for it.

    Nothing is written. The checks and the clipping of boxes are those of the converter
    (:func:`codetr.data.coco.prepare_coco`), so the numbers are what the shards will contain; the converter's
    warnings (dropped or clipped boxes, ...) are listed under the tables. A file the converter would reject
    for its annotations raises :class:`~codetr.data.format.DataError` with every problem found. Image files
    the converter would refuse (undecodable, truncated, unsupported mode, real size != the json's
    ``width``/``height``) are counted as corrupt and named in ``problems`` (``stats.ok`` is then False).

    Args:
        ann_file: COCO json (``images``, ``annotations``, ``categories``).
        images_dir: folder the ``file_name`` entries are relative to.
        console / show: as :func:`inspect_shards`.
        check_images: decode every image file as the converter does (``False``: annotations only).
        num_threads: decoding threads (default ``min(8, cpu count)``).
    """
    from codetr.data.coco import prepare_coco

    prepared = prepare_coco(ann_file, images_dir)
    stats = ShardStats(categories=list(prepared.categories))
    boxes = 0
    for record in prepared.records:
        meta = SampleMeta(**record.meta)
        boxes += meta.num_boxes
        _accumulate(stats, meta)
    if check_images and prepared.records:
        threads = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL decodes with the GIL released
            found = [p for p in pool.map(_check_file, prepared.records) if p is not None]
        found.sort(key=lambda p: p.kind != "size")  # size mismatches first, then corrupt (file order kept)
        stats.problems.extend(_describe(p) for p in found)
        stats.num_corrupt = len(found)
    stats.shards.append({"url": str(ann_file), "samples": stats.num_samples, "declared": None, "boxes": boxes,
                         "corrupt": stats.num_corrupt})
    if show:
        from rich.console import Console

        console = console or Console()
        _print(stats, console, source="COCO file")
        for w in prepared.warnings:
            console.print(f"[yellow]convert would warn:[/yellow] {w}")
    return stats


def _describe(problem: ImageProblem) -> str:
    return f"{'size mismatch' if problem.kind == 'size' else 'corrupt'}: {problem}"


def _check_file(record: Any) -> ImageProblem | None:
    try:
        with open(record.path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return ImageProblem(record.path, "corrupt", f"cannot read image file ({exc})")
    return check_image(data, record.path, int(record.meta["width"]), int(record.meta["height"]))


def _accumulate(stats: ShardStats, meta: SampleMeta) -> None:
    stats.num_samples += 1
    stats.num_boxes += meta.num_boxes
    stats.boxes_per_image.append(meta.num_boxes)
    stats.image_widths.append(meta.width)
    stats.image_heights.append(meta.height)
    if meta.num_boxes == 0:
        stats.images_without_boxes += 1
    for label in set(meta.labels):
        stats.category_images[label] = stats.category_images.get(label, 0) + 1
    img_area = float(meta.width * meta.height)
    for (_, _, w, h), label, crowd, area in zip(meta.boxes, meta.labels, meta.iscrowd, meta.area):
        stats.category_boxes[label] = stats.category_boxes.get(label, 0) + 1
        stats.crowd_boxes += crowd
        bucket = "small" if area < 32**2 else "medium" if area < 96**2 else "large"
        stats.size_buckets[bucket] += 1
        stats.relative_sizes.append((w * h / img_area) ** 0.5)
        stats.aspect_ratios.append(w / h)


def _print(stats: ShardStats, console: Any | None, source: str = "shard") -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"{source}s", title_justify="left")
    for col in (source, "samples", "index says", "boxes", "corrupt"):
        t.add_column(col, justify="left" if col == source else "right")
    for s in stats.shards:
        bad = s["declared"] is not None and s["declared"] != s["samples"]
        t.add_row(
            os.path.basename(s["url"]) or s["url"],
            f"[red]{s['samples']}[/red]" if bad else str(s["samples"]),
            "-" if s["declared"] is None else str(s["declared"]),
            str(s["boxes"]),
            f"[red]{s['corrupt']}[/red]" if s["corrupt"] else "0",
        )
    console.print(t)

    bpi = stats.boxes_per_image
    rows = [
        ("samples", stats.num_samples),
        ("boxes", stats.num_boxes),
        ("crowd boxes", stats.crowd_boxes),
        ("images without boxes", f"{stats.images_without_boxes} ({100 * stats.images_without_boxes / max(1, stats.num_samples):.1f}%)"),
        ("boxes / image (min / mean / max)", f"{min(bpi, default=0)} / {np.mean(bpi) if bpi else 0:.2f} / {max(bpi, default=0)}"),
        ("image width (min..max)", f"{min(stats.image_widths, default=0)}..{max(stats.image_widths, default=0)}"),
        ("image height (min..max)", f"{min(stats.image_heights, default=0)}..{max(stats.image_heights, default=0)}"),
        ("box size small / medium / large (COCO area)", " / ".join(str(v) for v in stats.size_buckets.values())),
        ("box size / image size, p5/p25/p50/p75/p95", _quantiles(stats.relative_sizes)),
        ("box aspect w/h, p5/p25/p50/p75/p95", _quantiles(stats.aspect_ratios)),
        ("corrupt samples / read errors", stats.num_corrupt),
    ]
    console.print(key_value_table("overview", rows))

    c = Table(title="categories", title_justify="left")
    for col in ("label", "category_id", "name", "boxes", "images"):
        c.add_column(col, justify="left" if col == "name" else "right")
    labels = range(len(stats.categories)) if stats.categories else sorted(stats.category_boxes)
    for label in labels:
        cat = stats.categories[label] if stats.categories and label < len(stats.categories) else None
        nb = stats.category_boxes.get(label, 0)
        c.add_row(
            str(label),
            "-" if cat is None else str(cat.id),
            "-" if cat is None else cat.name,
            f"[yellow]{nb}[/yellow]" if nb == 0 else str(nb),
            str(stats.category_images.get(label, 0)),
        )
    console.print(c)
    for m in stats.mismatches:
        console.print(f"[red]mismatch:[/red] {m}")
    for p in stats.problems[:_MAX_PROBLEMS_SHOWN]:
        console.print(f"[red]{escape(p)}[/red]")
    if len(stats.problems) > _MAX_PROBLEMS_SHOWN:
        console.print(f"[red]... ({len(stats.problems) - _MAX_PROBLEMS_SHOWN} more problems)[/red]")


def _colour(label: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def render_samples(
    source: str | os.PathLike[str] | Sequence[str],
    n: int,
    out_dir: str | os.PathLike[str],
    *,
    transforms: TransformsConfig | dict | None = None,
    train: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Draw the boxes and class names of the first ``n`` samples and save them as PNGs.

    Args:
        source: ``index.json``, its directory, or shard URLs/patterns.
        n: number of samples to render.
        out_dir: output folder (created); files are ``<image_id>.png``.
        transforms: optionally apply this augmentation recipe first (to check what the model sees);
            only its geometric part is applied, so colours stay natural.
        train: use the training pipeline of ``transforms`` (else the eval one).
        seed: augmentation seed.

    Returns:
        Paths of the written PNGs. Crowd boxes are drawn in gray.
    """
    urls, _, categories = _resolve(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = build_transforms(transforms, train) if transforms is not None else None
    written: list[Path] = []
    for url in urls:
        for raw in iter_shard_samples(url):
            if len(written) >= n:
                return written
            try:
                meta, data = parse_shard_sample(raw)
                image = decode_image(data, meta, f"{url}:{raw.get('__key__')}")
            except CorruptSampleError:
                continue
            target = meta_to_target(meta)
            if pipeline is not None:
                image, target = pipeline.geometric(image, target, random.Random(f"render/{seed}/{meta.image_id}"))
                if not isinstance(image, Image.Image):
                    image = Image.fromarray(image.permute(1, 2, 0).numpy())
            image = image.convert("RGB")
            draw = ImageDraw.Draw(image)
            for box, label, crowd in zip(target.boxes.tolist(), target.labels.tolist(), target.iscrowd.tolist()):
                colour = (128, 128, 128) if crowd else _colour(label)
                draw.rectangle(box, outline=colour, width=2)
                name = categories[label].name if categories and label < len(categories) else str(label)
                draw.text((box[0] + 3, box[1] + 2), f"{name}{' (crowd)' if crowd else ''}", fill=colour)
            path = out / f"{meta.image_id}.png"
            image.save(path)
            written.append(path)
    return written
