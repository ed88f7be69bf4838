"""Drawing detections and ground truth on images (PIL only).

Used by ``codetr predict`` (one PNG per image) and by the quickstart ("predictions next to ground
truth"). Boxes are xyxy absolute pixels in the frame of the image being drawn on (for ``predict`` that
is the original file, which is the frame of :class:`~codetr.core.structures.Detections`).
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from codetr.core.structures import Detections, Target

__all__ = ["class_color", "display_threshold", "draw_detections", "draw_targets", "draw_side_by_side", "to_pil"]


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hue walk, saturated and bright)."""
    hue = (0.12 + int(label) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def to_pil(image: Image.Image | np.ndarray | torch.Tensor | str | Path) -> Image.Image:
    """A path, PIL image, HWC uint8 array or CHW tensor in [0, 1] / [0, 255] -> RGB PIL image (a copy)."""
    if isinstance(image, (str, Path)):
        from codetr.data.decode import load_image_rgb

        return load_image_rgb(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu", torch.float32)
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        if t.numel() and t.max() <= 1.0:
            t = t * 255.0
        image = t.clamp(0, 255).round().to(torch.uint8).numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _label_text(label: int, class_names: Sequence[str] | None, score: float | None) -> str:
    name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
    return name if score is None else f"{name} {score:.2f}"


def _draw_boxes(image: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None,
                class_names: Sequence[str] | None, dashed: bool = False) -> Image.Image:
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 400))
    font = _font(max(10, round(max(out.size) / 60)))
    boxes = boxes.detach().to("cpu", torch.float32).reshape(-1, 4)
    labels = labels.detach().to("cpu").reshape(-1)
    sc = None if scores is None else scores.detach().to("cpu", torch.float32).reshape(-1)
    order = range(len(boxes)) if sc is None else torch.argsort(sc).tolist()  # best drawn last (on top)
    for i in order:
        x0, y0, x1, y1 = boxes[i].tolist()
        if not all(np.isfinite([x0, y0, x1, y1])):
            continue
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        lab = int(labels[i])
        color = class_color(lab)
        if dashed:
            _dashed_rect(draw, (x0, y0, x1, y1), color, width)
        else:
            draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        text = _label_text(lab, class_names, None if sc is None else float(sc[i]))
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0
        draw.rectangle((x0, ty, x0 + tw + 4, ty + th + 4), fill=color)
        draw.text((x0 + 2 - tb[0], ty + 2 - tb[1]), text, fill=(0, 0, 0), font=font)
    return out


def _dashed_rect(draw: ImageDraw.ImageDraw, box, color, width: int, dash: int = 8) -> None:
    x0, y0, x1, y1 = box
    for (a, b) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
        n = max(1, int(length // dash))
        for k in range(0, n, 2):
            t0, t1 = k / n, min(1.0, (k + 1) / n)
            draw.line((a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0,
                       a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1), fill=color, width=width)


def draw_detections(image, detections: Detections, class_names: Sequence[str] | None = None,
                    score_threshold: float = 0.0) -> Image.Image:
    """Draw detections (boxes, ``name score`` tags) with one colour per class; returns a new RGB image."""
    keep = detections.scores.detach().cpu() >= score_threshold
    return _draw_boxes(to_pil(image), detections.boxes.detach().cpu()[keep], detections.labels.detach().cpu()[keep],
                       detections.scores.detach().cpu()[keep], class_names)


def draw_targets(image, target: Target, class_names: Sequence[str] | None = None) -> Image.Image:
    """Draw ground-truth boxes (crowd boxes dashed) with their class names."""
    pil = to_pil(image)
    crowd = target.iscrowd.detach().cpu().bool()
    pil = _draw_boxes(pil, target.boxes[~crowd], target.labels[~crowd], None, class_names)
    if crowd.any():
        pil = _draw_boxes(pil, target.boxes[crowd], target.labels[crowd], None, class_names, dashed=True)
    return pil


def _titled(image: Image.Image, title: str) -> Image.Image:
    font = _font(max(12, round(image.width / 40)))
    probe = ImageDraw.Draw(image)
    tb = probe.textbbox((0, 0), title, font=font)
    bar = tb[3] - tb[1] + 10
    out = Image.new("RGB", (image.width, image.height + bar), (255, 255, 255))
    out.paste(image, (0, bar))
    ImageDraw.Draw(out).text((6 - tb[0], 5 - tb[1]), title, fill=(0, 0, 0), font=font)
    return out


def display_threshold(scores, num_objects: int, default: float = 0.3) -> float:
    """Score threshold for drawing: ``default``, lowered to the ``num_objects``-th best score when fewer
    detections reach it (an early, under-confident model still shows its best guesses). Floored at 0.01."""
    import torch

    scores = torch.as_tensor(scores).detach().flatten()
    k = max(1, int(num_objects))
    if scores.numel() == 0 or int((scores >= default).sum()) >= k:
        return default
    kth = float(scores.topk(min(k, scores.numel())).values[-1])
    return max(0.01, min(default, kth))


def draw_side_by_side(image, gt_target: Target, detections: Detections, class_names: Sequence[str] | None,
                      path: str | Path | None = None, score_threshold: float = 0.3) -> Image.Image:
    """Ground truth (left) next to predictions (right) on the same image; saved to ``path`` when given.

    Both ``gt_target`` and ``detections`` must be in the frame of ``image`` (e.g. the original file).
    """
    pil = to_pil(image)
    left = _titled(draw_targets(pil, gt_target, class_names), f"ground truth ({len(gt_target)})")
    n_shown = int((detections.scores.detach().cpu() >= score_threshold).sum())
    right = _titled(draw_detections(pil, detections, class_names, score_threshold),
                    f"predictions ({n_shown}, score >= {score_threshold:.2g})")
    gap = 8
    out = Image.new("RGB", (left.width + right.width + gap, max(left.height, right.height)), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(path)
    return out
