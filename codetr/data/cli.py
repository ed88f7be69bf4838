"""``codetr data ...``: convert COCO to shards, write synthetic data, inspect shards.

The main CLI mounts :data:`app` as ``codetr data``; it also works standalone
(``python -m codetr.data.cli --help``). Data errors are printed in red without a traceback and exit
with status 1.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from codetr.data.format import DataError

__all__ = ["app"]

app = typer.Typer(
    name="data",
    help="Convert COCO datasets to webdataset shards, write synthetic data, inspect shards or COCO files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_out = Console()
_err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(fn: F) -> F:
    """Print data/config/file errors in red (no traceback) and exit with status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DataError, ValidationError, OSError) as exc:
            _err.print(f"[bold red]error:[/bold red] [red]{escape(str(exc))}[/red]")
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


@app.command("convert")
@_friendly_errors
def convert_cmd(
    coco: Annotated[Path, typer.Option("--coco", help="COCO detection annotation file (json).")],
    images: Annotated[Path, typer.Option("--images", help="Folder the 'file_name' entries of the json are relative to.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the shards and index.json.")],
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Maximum images per shard (shards are balanced).")] = 1000,
    workers: Annotated[Optional[int], typer.Option("--workers", min=0, help="Writer processes (default: min(cpus, shards, 8)).")] = None,
    prefix: Annotated[str, typer.Option("--prefix", help="Shard file prefix: <prefix>-000000.tar.")] = "shard",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset already in --out.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Validate a COCO json and write webdataset shards + index.json.

    Every annotation check runs before anything is written: unknown category ids, duplicate image ids
    and missing image files are errors; out-of-image boxes are clipped and zero-size boxes dropped (both
    counted in the printed report). Image bytes are copied untouched, but each image is fully decoded
    as training will decode it: truncated/undecodable files, unsupported image modes and images whose
    real size differs from the json's width/height make the conversion fail (exit 1) with every
    offender listed, and nothing is written.
    """
    from codetr.data.convert import convert_coco

    convert_coco(
        coco,
        images,
        out,
        shard_size=shard_size,
        num_workers=workers,
        prefix=prefix,
        overwrite=overwrite,
        progress=progress,
        console=_out,
    )


@app.command("synth")
@_friendly_errors
def synth_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    num_images: Annotated[int, typer.Option("--num-images", min=0, help="Number of (training) images.")],
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed (same seed = identical files).")] = 0,
    val_images: Annotated[int, typer.Option("--val-images", min=0, help="Also write a val split: OUT/train and OUT/val.")] = 0,
    image_format: Annotated[str, typer.Option("--format", help="jpg, png or mixed.")] = "jpg",
    shards: Annotated[bool, typer.Option("--shards", help="Also convert each split to shards (OUT/.../shards).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a synthetic dataset a previous `codetr data "
                                            "synth` wrote in OUT (other files are never replaced).")] = False,
) -> None:
    """Write a deterministic synthetic shapes dataset (COCO json + images).

    Six classes (circle, rectangle, triangle, star, cross, ring) with varied sizes, aspect ratios,
    occlusion and cluttered backgrounds. Without --val-images the files go to OUT/annotations.json and
    OUT/images/; with it, to OUT/train/ and OUT/val/. OUT must be new or empty, or hold a previous
    synthetic dataset (replaced only with --overwrite): synth never writes over a file it did not
    create, and refuses (exit 1, nothing written) when OUT holds anything else.
    """
    from codetr.data.synth import claim_output_dir, make_synthetic, make_synthetic_splits

    if image_format not in ("jpg", "png", "mixed"):
        raise DataError(f"--format must be jpg, png or mixed, got {image_format!r}")
    if val_images > 0:
        made = make_synthetic_splits(out, num_images, val_images, seed, image_format=image_format,  # type: ignore[arg-type]
                                     overwrite=overwrite)
    else:
        made = {"all": make_synthetic(out, num_images, seed, image_format=image_format,  # type: ignore[arg-type]
                                      overwrite=overwrite)}
    for split, ds in made.items():
        _out.print(f"[green]{split}[/green]: {ds.num_images} images, {ds.num_boxes} boxes -> {ds.ann_file}")
        if shards:
            from codetr.data.convert import convert_coco

            shard_dir = claim_output_dir(ds, "shards")
            convert_coco(ds.ann_file, ds.images_dir, shard_dir, shard_size=max(1, ds.num_images // 8 or 1),
                         num_workers=0, progress=False, verbose=False, console=_out)
            _out.print(f"    shards -> {shard_dir}")


@app.command("inspect")
@_friendly_errors
def inspect_cmd(
    path: Annotated[str, typer.Argument(help="index.json, a folder containing it, a shard URL/brace pattern, "
                                             "or a COCO annotation json (checked as `convert` would).")],
    images: Annotated[Optional[Path], typer.Option("--images", help="Images folder of a COCO json (default: "
                                                   "'images' next to the json, else the json's folder).")] = None,
    render: Annotated[int, typer.Option("--render", min=0, help="Also draw boxes on this many samples.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for rendered PNGs (required with --render).")] = None,
    max_shards: Annotated[Optional[int], typer.Option("--max-shards", min=1, help="Only read the first N shards.")] = None,
    check_images: Annotated[bool, typer.Option("--check-images/--no-check-images", help="Decode every image as "
                                               "training does and compare its size with its annotations.")] = True,
) -> None:
    """Print data statistics (samples per shard, boxes per image, categories, box sizes).

    Shards: sample counts are checked against index.json; corrupt samples are counted. A COCO json is
    validated exactly as `codetr data convert` would (nothing is written) and the same tables are printed.
    Every image is decoded (unless --no-check-images): truncated/undecodable files, unsupported modes and
    images whose real size differs from their annotations are named. Exit status 1 when any sample is
    corrupt or a shard's sample count differs from index.json.
    """
    from codetr.data.inspect import inspect_coco, inspect_shards, is_coco_json, render_samples

    if render and out is None:
        raise DataError("--render needs --out DIR for the PNG files")
    if is_coco_json(path):
        if render:
            raise DataError("--render draws converted shards; convert the COCO file first (codetr data convert)")
        if images is None:
            images = Path(path).parent / "images" if (Path(path).parent / "images").is_dir() else Path(path).parent
        _exit_on_problems(inspect_coco(path, images, console=_out, check_images=check_images), "convert would fail")
        return
    if images is not None:
        raise DataError(f"--images only applies to a COCO annotation json; {path} is not one")
    stats = inspect_shards(path, console=_out, max_shards=max_shards, check_images=check_images)
    if render:
        assert out is not None
        paths = render_samples(path, render, out)
        _out.print(f"rendered {len(paths)} samples to {out}")
    _exit_on_problems(stats, "training would skip the corrupt samples")


def _exit_on_problems(stats: Any, consequence: str) -> None:
    if stats.ok:
        return
    parts = []
    if stats.num_corrupt:
        parts.append(f"{stats.num_corrupt} corrupt sample(s)/image file(s) (listed above)")
    if stats.mismatches:
        parts.append(f"{len(stats.mismatches)} shard count mismatch(es) with index.json")
    _err.print(f"[bold red]error:[/bold red] [red]{escape('; '.join(parts) or 'problems found')}: {consequence}[/red]")
    raise typer.Exit(code=1)


if __name__ == "__main__":  # pragma: no cover
    app()
