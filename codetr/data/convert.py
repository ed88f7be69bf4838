"""Convert a COCO detection set (json + image folder) into codetr webdataset shards + ``index.json``.

The format is described in :mod:`codetr.data.format`. Conversion is:

1. :func:`codetr.data.coco.prepare_coco` validates the whole annotation file *before anything is
   written*: unknown category ids, unknown/duplicate image ids, malformed boxes and missing image files
   (``os.path.exists``) are errors that name the first offenders; out-of-image boxes are clipped,
   zero-size boxes dropped (both counted); crowd boxes and images without boxes are kept.
2. Images are split into shards of balanced sizes (at most ``shard_size`` samples each, counts differ by
   at most one) in the order of the annotation file.
3. Shards are written by a process pool, each worker writing whole shards; image bytes are read one
   file at a time and copied untouched into the tar, so memory stays flat even for COCO train2017
   (118k images). Each shard is written to ``<name>.partial`` and renamed when complete.
   Every image is also fully decoded as training will decode it (:func:`codetr.data.images.check_image`:
   every PIL mode, truncation detected, EXIF ignored) and its real size compared with the json's
   ``width``/``height``. Undecodable/truncated files, unsupported modes and size mismatches are
   collected over *all* shards; if there is any, the shards are removed, no index is written and a
   :class:`ImageCheckError` lists every offender (file, json size, real size). There is no option to
   skip them: fix the files or the json entries (sizes are those of the stored pixel grid).
4. ``index.json`` is written last, atomically (tmp file + ``os.replace``): a directory with an index is
   always complete.

Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0444), so the same input gives byte-identical
shards whatever the worker count.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import re
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict

from codetr.data.coco import ImageRecord, PreparedCoco, prepare_coco
from codetr.data.images import ImageProblem, check_image
from codetr.data.format import (
    INDEX_FILENAME,
    CategoryInfo,
    ConversionCounts,
    DataError,
    DatasetIndex,
    ShardInfo,
    image_extension,
    load_index,
    make_key,
    save_index,
)
from codetr.data.tables import key_value_table

__all__ = ["ConversionReport", "ImageCheckError", "convert_coco", "plan_shard_sizes", "write_shard",
           "format_image_problems"]

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_PROGRESS_EVERY = 32
_progress_queue: Any = None  # set in pool workers by _init_worker
#: How many offending image files an :class:`ImageCheckError` lists.
MAX_PROBLEMS_LISTED = 20


def format_image_problems(problems: Sequence[ImageProblem], limit: int = MAX_PROBLEMS_LISTED) -> str:
    """Offending image files grouped by kind, one per line (at most ``limit`` per kind)."""
    lines: list[str] = []
    for kind, title in (
        ("size", "real image size differs from the json's width/height"),
        ("corrupt", "undecodable, truncated or unsupported image files"),
    ):
        group = [p for p in problems if p.kind == kind]
        if not group:
            continue
        lines.append(f"{len(group)} {title}:")
        lines.extend(f"    {p}" for p in group[:limit])
        if len(group) > limit:
            lines.append(f"    ... ({len(group) - limit} more)")
    return "\n".join(lines)


class ImageCheckError(DataError):
    """Image files that training could not use (corrupt, truncated, unsupported mode, wrong size).

    Attributes:
        problems: every offender, as :class:`~codetr.data.images.ImageProblem` (file, kind, detail).
    """

    def __init__(self, problems: Sequence[ImageProblem], context: str = ""):
        self.problems = list(problems)
        self.context = context
        head = f"{context}: " if context else ""
        super().__init__(
            f"{head}{len(self.problems)} image file(s) cannot be used as annotated, nothing was written:\n  "
            + format_image_problems(self.problems).replace("\n", "\n  ")
            + "\n  fix the files, or the json's width/height (the stored pixel size; EXIF orientation is "
            "not applied), or remove these images from the json"
        )

    def __reduce__(self) -> Any:  # keep ``problems`` through process-pool pickling
        return (type(self), (self.problems, self.context))


class ConversionReport(BaseModel):
    """Result of :func:`convert_coco` (also what ``codetr data convert`` prints)."""

    model_config = ConfigDict(extra="forbid")

    source_annotations: str
    images_dir: str
    out_dir: str
    index_path: str
    num_shards: int
    num_samples: int
    num_classes: int
    categories: list[CategoryInfo]
    counts: ConversionCounts
    warnings: list[str]
    seconds: float

    def render(self, console: Any | None = None, max_categories: int = 30) -> None:
        """Print the report and the class mapping (contiguous label <-> COCO category id) with rich."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        c = self.counts
        rows = [
            ("images in file", c.images),
            ("images written", c.images_written),
            ("  of which without boxes (kept)", c.images_without_boxes),
            ("image sizes read from files", c.image_sizes_read_from_files),
            ("annotations in file", c.annotations),
            ("boxes written", c.boxes_written),
            ("  of which crowd (kept, iscrowd=1)", c.crowd_boxes),
            ("boxes clipped to the image", c.boxes_clipped),
            ("boxes dropped: zero/negative size", c.boxes_dropped_degenerate),
            ("boxes dropped: outside the image", c.boxes_dropped_outside),
            ("categories / num_classes", self.num_classes),
            ("shards", self.num_shards),
            ("output", self.index_path),
            ("time", f"{self.seconds:.1f} s"),
        ]
        console.print(key_value_table(f"codetr data convert: {self.source_annotations}", rows))
        m = Table(title="class mapping (label = rank of category id)", title_justify="left")
        m.add_column("label", justify="right")
        m.add_column("category_id", justify="right")
        m.add_column("name")
        for label, cat in enumerate(self.categories[:max_categories]):
            m.add_row(str(label), str(cat.id), cat.name)
        if len(self.categories) > max_categories:
            m.add_row("...", "...", f"({len(self.categories) - max_categories} more in index.json)")
        console.print(m)
        for w in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")


def plan_shard_sizes(num_samples: int, shard_size: int, num_shards: int | None = None) -> list[int]:
    """Balanced shard sizes: ``ceil(N / shard_size)`` shards (or ``num_shards``), sizes differ by <= 1.

    Example: ``plan_shard_sizes(1001, 1000) == [501, 500]`` (not ``[1000, 1]``): balanced shards keep
    per-worker and per-rank sample counts even.
    """
    if num_samples <= 0:
        return []
    if num_shards is None:
        if shard_size <= 0:
            raise DataError(f"shard_size must be > 0, got {shard_size}")
        num_shards = math.ceil(num_samples / shard_size)
    if num_shards <= 0:
        raise DataError(f"num_shards must be > 0, got {num_shards}")
    num_shards = min(num_shards, num_samples)
    base, extra = divmod(num_samples, num_shards)
    return [base + (1 if i < extra else 0) for i in range(num_shards)]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "codetr"
    return info


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


def write_shard(path: str, records: Sequence[ImageRecord]) -> ShardInfo:
    """Write one shard: for each record ``<key>.<ext>`` (untouched image bytes) + ``<key>.json``.

    Image files are read one at a time and each is checked with :func:`~codetr.data.images.check_image`
    (full decode, real size vs the json's). The tar goes to ``path + '.partial'`` and is renamed to
    ``path`` once complete. Progress (samples written) is pushed to the pool's progress queue when
    there is one.

    Raises:
        ImageCheckError: some images are corrupt/truncated/unsupported or not the annotated size (all of
            this shard's offenders are listed; nothing is left on disk for this shard).
        DataError: an image file cannot be read or is not a supported image type.
    """
    tmp = path + ".partial"
    num_boxes = 0
    pending = 0
    problems: list[ImageProblem] = []
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for rec in records:
                meta = rec.meta
                try:
                    with open(rec.path, "rb") as imf:
                        data = imf.read()
                except OSError as exc:
                    raise DataError(f"{rec.path}: cannot read image file ({exc})") from exc
                ext = image_extension(data, rec.path)  # unknown file type: fails at once, as before
                problem = check_image(data, rec.path, int(meta["width"]), int(meta["height"]))
                if problem is not None:
                    problems.append(problem)
                if not problems:  # once the shard is doomed, only check the remaining images
                    key = make_key(meta["image_id"], meta["file_name"])
                    js = json.dumps(meta, separators=(",", ":")).encode("utf-8")
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
                    tar.addfile(_tarinfo(f"{key}.json", len(js)), io.BytesIO(js))
                    num_boxes += len(meta["boxes"])
                pending += 1
                if _progress_queue is not None and pending >= _PROGRESS_EVERY:
                    _progress_queue.put(pending)
                    pending = 0
        if problems:
            raise ImageCheckError(problems)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if _progress_queue is not None and pending:
        _progress_queue.put(pending)
    return ShardInfo(
        file=os.path.basename(path), num_samples=len(records), num_boxes=num_boxes, num_bytes=os.path.getsize(path)
    )


def _clean_output(out: Path, prefix: str, overwrite: bool) -> None:
    index_path = out / INDEX_FILENAME
    old_shards = sorted(out.glob(f"{prefix}-*.tar")) if out.exists() else []
    if not overwrite and (index_path.exists() or old_shards):
        raise DataError(
            f"{out}: already contains a converted dataset ({INDEX_FILENAME} or {prefix}-*.tar); "
            "choose another output directory or pass overwrite=True (--overwrite)"
        )
    if not overwrite:
        return
    listed: list[Path] = []
    if index_path.exists():
        try:
            index, root = load_index(index_path)
            listed = [root / s.file for s in index.shards]
        except DataError:
            pass
        index_path.unlink()  # first: a crash below never leaves an index pointing to a mix of shards
    for p in {*old_shards, *listed, *out.glob(f"{prefix}-*.tar.partial")}:
        if p.exists() and p.parent == out:
            p.unlink()


def _pool_context() -> Any:
    """``fork`` where available: workers start without re-importing the caller's ``__main__`` (plain
    scripts need no ``if __name__ == "__main__"`` guard); ``spawn`` elsewhere."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _run_jobs(
    jobs: list[tuple[str, list[ImageRecord]]], num_workers: int, total: int, progress: bool, console: Any
) -> list[ShardInfo]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]writing shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    results: list[ShardInfo | None] = [None] * len(jobs)
    problems: list[list[ImageProblem]] = [[] for _ in jobs]  # per job: the report keeps file order
    if num_workers <= 1 or len(jobs) == 1:
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task("shards", total=total)
            for i, (path, recs) in enumerate(jobs):
                try:
                    results[i] = write_shard(path, recs)
                except ImageCheckError as exc:  # keep going: report every offender at once
                    problems[i] = exc.problems
                bar.advance(task, len(recs))
        _raise_problems(problems)
        return [r for r in results if r is not None]

    ctx = _pool_context()
    queue = ctx.Queue()
    pool = ProcessPoolExecutor(
        max_workers=min(num_workers, len(jobs)), mp_context=ctx, initializer=_init_worker, initargs=(queue,)
    )
    try:
        # Submit (and so start every worker) before rich starts its refresh thread.
        futures: dict[Future[ShardInfo], int] = {
            pool.submit(write_shard, path, recs): i for i, (path, recs) in enumerate(jobs)
        }
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task("shards", total=total)

            def drain() -> None:
                while True:
                    try:
                        n = queue.get_nowait()
                    except Exception:  # noqa: BLE001 - queue.Empty
                        return
                    bar.advance(task, n)

            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for fut in done:
                    exc = fut.exception()
                    if isinstance(exc, ImageCheckError):
                        problems[futures[fut]] = exc.problems
                        continue
                    if exc is not None:
                        path = jobs[futures[fut]][0]
                        if isinstance(exc, DataError):
                            raise exc
                        raise DataError(f"{path}: writing the shard failed ({type(exc).__name__}: {exc})") from exc
                    results[futures[fut]] = fut.result()
            time.sleep(0.05)
            drain()
            bar.update(task, completed=total)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        queue.close()
        queue.join_thread()
    _raise_problems(problems)
    return [r for r in results if r is not None]


def _raise_problems(problems: list[list[ImageProblem]]) -> None:
    flat = [p for group in problems for p in group]
    if flat:
        raise ImageCheckError(flat)


def convert_coco(
    ann_json: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = 1000,
    num_shards: int | None = None,
    num_workers: int | None = None,
    prefix: str = "shard",
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = True,
    console: Any | None = None,
) -> ConversionReport:
    """Convert COCO ``ann_json`` + ``images_dir`` into shards + ``index.json`` under ``out_dir``.

    Args:
        ann_json: COCO detection annotation file.
        images_dir: folder the ``file_name`` entries are relative to.
        out_dir: output directory (created); must not already hold a dataset unless ``overwrite``.
        shard_size: maximum samples per shard (sizes are balanced, see :func:`plan_shard_sizes`).
            Aim for >= ``world_size * num_workers`` shards per split so every loader worker owns shards.
        num_shards: exact number of shards instead of ``shard_size``.
        num_workers: writer processes (each writes whole shards); ``None`` = ``min(cpu_count, shards, 8)``,
            ``0``/``1`` = write in this process. The output is identical for any value.
        prefix: shard file prefix (``[A-Za-z0-9_-]+``): shards are ``<prefix>-000000.tar``, ...
        overwrite: replace an existing dataset in ``out_dir`` (its index is removed first).
        progress: show a rich progress bar.
        verbose: print the conversion report and class mapping.
        console: rich console to print to.

    Returns:
        The :class:`ConversionReport` (its counts are also stored in ``index.json``).

    Raises:
        ImageCheckError: image files that are corrupt, truncated, of an unsupported mode or whose real
            size differs from the json's ``width``/``height`` (every offender listed; nothing written).
        DataError: invalid annotations / missing images (nothing written), or a shard write failure.
    """
    t0 = time.perf_counter()
    if not _PREFIX_RE.match(prefix):
        raise DataError(f"prefix {prefix!r} must match [A-Za-z0-9_-]+ (it becomes part of shard file names)")
    prepared: PreparedCoco = prepare_coco(ann_json, images_dir)
    records = prepared.records
    if not records:
        raise DataError(f"{ann_json}: 'images' is empty, nothing to convert")
    sizes = plan_shard_sizes(len(records), shard_size, num_shards)
    out = Path(out_dir)
    _clean_output(out, prefix, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[str, list[ImageRecord]]] = []
    start = 0
    for i, n in enumerate(sizes):
        jobs.append((str(out / f"{prefix}-{i:06d}.tar"), records[start : start + n]))
        start += n
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, len(jobs), 8)
    if console is None:
        from rich.console import Console

        console = Console()
    try:
        try:
            shards = _run_jobs(jobs, num_workers, len(records), progress, console)
        except ImageCheckError as exc:
            raise ImageCheckError(exc.problems, os.fspath(ann_json)) from None
    except BaseException:
        for path, _ in jobs:  # no index was written: leave no half-converted dataset behind
            for p in (path, path + ".partial"):
                if os.path.exists(p):
                    os.unlink(p)
        raise

    from codetr.data import __version__ as data_version

    index = DatasetIndex(
        num_samples=len(records),
        shards=shards,
        categories=prepared.categories,
        label_to_category_id=prepared.label_to_category_id,
        source_annotations=os.path.basename(os.fspath(ann_json)),
        counts=prepared.counts,
        created_with=f"codetr {data_version}",
    )
    index_path = save_index(index, out / INDEX_FILENAME)
    warnings = list(prepared.warnings)
    if len(shards) < 8:
        warnings.append(
            f"only {len(shards)} shard(s): streaming loaders give each (rank, worker) pair its own shards; "
            "with fewer shards than ranks x workers, workers share shards at sample level (slower). "
            "Use a smaller --shard-size for multi-GPU training"
        )
    report = ConversionReport(
        source_annotations=str(ann_json),
        images_dir=str(images_dir),
        out_dir=str(out),
        index_path=str(index_path),
        num_shards=len(shards),
        num_samples=len(records),
        num_classes=prepared.num_classes,
        categories=prepared.categories,
        counts=prepared.counts,
        warnings=warnings,
        seconds=time.perf_counter() - t0,
    )
    if verbose:
        report.render(console)
    return report
