"""Single-image / folder inference: ``codetr predict recipe.yaml --checkpoint w.pt img.jpg dir/ --out preds/``.

For every image: one JSON (boxes xyxy in original pixels, scores, labels, category ids and names) and
one PNG with the boxes drawn. Images go through the recipe's *evaluation* transforms one at a time (no
cross-image padding), and ``Detector.predict`` maps boxes back to the original image frame.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image
from rich.console import Console
from torch import nn

from codetr.core.structures import Target
from codetr.data.decode import load_image_rgb
from codetr.data.format import atomic_write_bytes
from codetr.engine import factories
from codetr.engine.checkpoint import extract_state_dict, load_checkpoint, load_weights
from codetr.engine.distributed import resolve_device
from codetr.engine.visualize import draw_detections

if TYPE_CHECKING:  # pragma: no cover
    from codetr.core.config.schema import Recipe

__all__ = ["IMAGE_SUFFIXES", "expand_image_paths", "class_info", "predict_images", "plan_outputs", "PredictError"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def expand_image_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted, non-recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    if not out:
        raise FileNotFoundError(f"no image files in {', '.join(map(str, paths))} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return out


def class_info(recipe: "Recipe", checkpoint_state: dict[str, Any] | None, num_classes: int) -> tuple[list[str], list[int]]:
    """Class names and category ids: from the checkpoint (written by the trainer), else the recipe's data,
    else ``class_<i>`` / ``i``."""
    classes = (checkpoint_state or {}).get("classes")
    if isinstance(classes, dict) and classes.get("names"):
        return list(classes["names"]), [int(c) for c in classes.get("category_ids") or range(len(classes["names"]))]
    for split in ("val", "train"):
        src = getattr(recipe.data, split, None)
        if src is None:
            continue
        cats = _source_categories(src)
        if cats:
            names = [str(c["name"] if isinstance(c, dict) else c.name) for c in cats]
            ids = [int(c["id"] if isinstance(c, dict) else c.id) for c in cats]
            return names, ids
    return [f"class_{i}" for i in range(num_classes)], list(range(num_classes))


def _source_categories(src: Any) -> list[Any] | None:
    """Categories of a data source in contiguous-label order, or ``None`` (data not reachable here).

    Uses ``codetr.data.loader.source_categories`` when the data package provides it; otherwise reads the
    index (``index`` sources) or the COCO json (``coco`` sources) through codetr.data's own validation.
    """
    try:
        from codetr.data import loader as data_loader

        fn = getattr(data_loader, "source_categories", None)
        if fn is not None:
            return fn(src)
        if getattr(src, "index", None) is not None:
            from codetr.data.format import load_index

            return list(load_index(src.index)[0].categories)
        if getattr(src, "coco", None) is not None:
            import json as _json

            from codetr.data.format import category_mapping

            data = _json.loads(Path(src.coco.ann_file).read_text(encoding="utf-8"))
            return list(category_mapping(data["categories"])[0])
    except Exception:  # noqa: BLE001 - inference must work without the training data
        return None
    return None


def _eval_pipeline(recipe: "Recipe"):
    from codetr.data.transforms import build_transforms

    src = recipe.data.val or recipe.data.train
    spec = src.transforms if src is not None else None
    size_divisor = src.size_divisor if src is not None else 1
    return build_transforms(spec, train=False), size_divisor


@torch.no_grad()
def predict_images(
    recipe: "Recipe",
    checkpoint: str | os.PathLike[str] | None,
    image_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    score_threshold: float = 0.3,
    *,
    model_factory: Callable[[Any], nn.Module] | None = None,
    device: str | None = None,
    draw: bool = True,
    console: Console | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run the detector of ``recipe`` with ``checkpoint`` weights on images (files or folders).

    Writes ``<out_dir>/<stem>.json`` and (``draw``) ``<out_dir>/<stem>.png`` per image and returns the
    JSON payloads. ``score_threshold`` filters what is written and drawn (use 0 for COCO-style results).

    Files: every output is planned and checked before the first is written (:func:`plan_outputs`: never an
    input, never a file an earlier ``predict`` did not write unless ``overwrite``) and written atomically.
    Inputs that are not readable images are skipped and listed at the end (:class:`PredictError`).
    """
    from codetr.data.collate import Sample, collate

    console = console or Console()
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {score_threshold}")
    paths = expand_image_paths(image_paths)
    dev = resolve_device(device or recipe.runtime.device)
    model = (model_factory or factories.default_model_factory)(recipe.model)
    state = None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        report = load_weights(model, extract_state_dict(state), source=str(checkpoint))
        if not report.loaded:
            raise ValueError(f"{checkpoint}: no tensor matches this model (wrong recipe for this checkpoint?)")
        if report.missing or report.unexpected or report.skipped_shape:
            console.print(report.table())
            console.print("[yellow]warning:[/] the checkpoint does not fully match the model (see above)")
    else:
        console.print("[yellow]warning:[/] no --checkpoint: predicting with randomly initialised weights")
    model.to(dev).eval()
    num_classes = int(getattr(recipe.model, "num_classes", None) or getattr(model, "num_classes", 0) or 0)
    names, cat_ids = class_info(recipe, state, num_classes)
    pipeline, size_divisor = _eval_pipeline(recipe)
    out = Path(out_dir)
    plan = plan_outputs(paths, out, draw, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    failed: list[tuple[Path, str]] = []
    for i, (path, (json_path, png_path)) in enumerate(zip(paths, plan)):
        try:
            image = load_image_rgb(path)  # every image mode decoded to 8-bit RGB, or a clear error
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # not an image / truncated / corrupt
            failed.append((path, f"{type(exc).__name__}: {exc}"))
            console.print(f"[yellow]skipped[/] {path}: not a readable image ({exc})", highlight=False)
            continue
        w, h = image.size
        tensor, target = pipeline(image, Target.empty(), random.Random(0))
        batch = collate([Sample(tensor, target, i, (h, w))], size_divisor, getattr(pipeline, "canvas_size", None)).to(dev)
        det = model.predict(batch)[0].to("cpu")
        keep = det.scores.float() >= score_threshold
        boxes, scores, labels = det.boxes[keep].float(), det.scores[keep].float(), det.labels[keep].long()
        order = torch.argsort(scores, descending=True)
        boxes, scores, labels = boxes[order], scores[order], labels[order]
        dets = []
        for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            dets.append({"bbox_xyxy": [round(v, 2) for v in b], "score": round(s, 5), "label": int(lab),
                         "category_id": cat_ids[lab] if 0 <= lab < len(cat_ids) else int(lab),
                         "category_name": names[lab] if 0 <= lab < len(names) else str(lab)})
        payload = {"image": str(path), "width": w, "height": h, "score_threshold": score_threshold,
                   "num_detections": len(dets), "detections": dets}
        _write_json(json_path, payload)
        if png_path is not None:
            from codetr.core.structures import Detections

            png = io.BytesIO()
            draw_detections(image, Detections(boxes, scores, labels), names).save(png, format="PNG")
            atomic_write_bytes(png_path, png.getvalue())
            _remember(out, png_path)
        results.append(payload)
        console.print(f"{path}: {len(dets)} detection(s) >= {score_threshold:g}", highlight=False)
    console.print(f"[green]wrote[/] {len(results)} JSON{' + PNG' if draw else ''} file(s) to {out}")
    if failed:
        listing = "\n".join(f"  {p}: {why}" for p, why in failed[:20])
        more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
        raise PredictError(f"{len(failed)} of {len(paths)} input file(s) are not readable images and were skipped "
                           f"(the other {len(results)} were predicted):\n{listing}{more}")
    return results


class PredictError(RuntimeError):
    """Some inputs could not be predicted (listed); the others were written."""


#: the files ``predict_images`` wrote into an output folder, one name per line (so a later run may replace
#: them, and nothing else)
MANIFEST = ".codetr-predict"


def _written(out: Path) -> set[str]:
    m = out / MANIFEST
    return set(m.read_text(encoding="utf-8").split("\n")) - {""} if m.is_file() else set()


def _remember(out: Path, path: Path) -> None:
    with open(out / MANIFEST, "a", encoding="utf-8") as f:
        f.write(path.name + "\n")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
    _remember(path.parent, path)


def plan_outputs(paths: Sequence[Path], out: Path, draw: bool, *, overwrite: bool = False
                 ) -> list[tuple[Path, Path | None]]:
    """The ``(json, png or None)`` output of every input, checked before anything is written.

    Raises ``FileExistsError`` when an output would replace one of the inputs (``--out`` is an input folder
    and names collide), or a file in ``out`` that an earlier ``predict`` did not write (unless ``overwrite``).
    """
    inputs = {p.resolve() for p in paths}
    ours = _written(out)
    plan, used = [], set()
    for i, p in enumerate(paths):
        stem = p.stem if p.stem not in used else f"{p.stem}_{i}"  # same file name in two folders
        used.add(stem)
        plan.append((out / f"{stem}.json", out / f"{stem}.png" if draw else None))
    for json_path, png_path in plan:
        for f in (json_path, png_path):
            if f is None:
                continue
            if f.resolve() in inputs:
                raise FileExistsError(f"--out {out}: the output {f.name} would replace the input image {f}; "
                                      "choose an output folder that is not an input folder")
            if f.exists() and f.name not in ours and not overwrite:
                raise FileExistsError(f"--out {out}: {f} exists and was not written by codetr predict; nothing "
                                      "was written. Choose another --out, or pass --overwrite to replace it")
    return plan
