"""COCO evaluation of a detector on the validation loader, as the trainer runs it (every rank).

:func:`evaluate_detector` lets every rank predict its share of ``data.val`` (``detector.predict`` under
autocast, not through DDP, under an isolated RNG so evaluating never changes the training trajectory),
gathers and de-duplicates the results in :class:`~codetr.evaluation.CocoEvaluator`, computes and prints
the tables on the main rank and broadcasts the flat metrics.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Mapping

import torch
from rich.console import Console
from torch import nn

from codetr.core.structures import Batch, Target
from codetr.engine import distributed as du
from codetr.engine.precision import autocast
from codetr.engine.rng import isolated_rng

if TYPE_CHECKING:  # pragma: no cover
    from codetr.core.config.schema import EvalConfig
    from codetr.evaluation import CocoEvaluator, CocoMetrics

__all__ = ["target_to_original", "make_evaluator", "evaluate_detector"]


def target_to_original(batch: Batch, i: int) -> Target:
    """Ground truth of image ``i`` mapped back to the original file's frame.

    Valid for evaluation transforms, which only resize (optionally to a fixed canvas): the scale is
    ``orig_size / image_size`` per axis. ``area`` is already in original pixels.
    """
    t = batch.targets[i]
    h, w = (float(x) for x in batch.image_sizes[i].tolist())
    oh, ow = (float(x) for x in batch.orig_sizes[i].tolist())
    scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=torch.float64)
    boxes = (t.boxes.detach().cpu().double() * scale).float()
    return Target(boxes=boxes, labels=t.labels.cpu(), iscrowd=t.iscrowd.cpu(),
                  area=None if t.area is None else t.area.cpu())


def make_evaluator(val_loader: Any, ev: "EvalConfig", num_classes: int | None) -> "CocoEvaluator":
    """An evaluator for the categories of ``val_loader.info`` (else ``num_classes`` anonymous classes)."""
    from codetr.evaluation import CocoEvaluator

    info = getattr(val_loader, "info", None)
    cats = getattr(info, "categories", None) if info is not None else None
    if cats:
        categories = [{"id": int(c.id), "name": str(c.name)} if not isinstance(c, Mapping)
                      else {"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats]
        mapping = [c["id"] for c in categories]
    else:
        n = int(num_classes or 1)
        mapping = list(range(n))
        categories = [f"class_{i}" for i in range(n)]
    return CocoEvaluator(None, mapping, backend=ev.backend, max_dets=ev.max_dets, categories=categories)


@torch.no_grad()
def evaluate_detector(model: nn.Module, val_loader: Any, evaluator: "CocoEvaluator", *, device: torch.device,
                      dtype: torch.dtype | None, console: Console, is_main: bool,
                      per_class: bool) -> "tuple[CocoMetrics | None, dict[str, Any] | None]":
    """Collective: ``(metrics, flat)`` — :class:`CocoMetrics` on every rank and the flat metrics dict
    (``None`` when the main rank produced none); ``model`` is left in the train/eval mode it was in."""
    from codetr.evaluation import CocoMetrics

    was_training = model.training
    model.eval()
    ctx = autocast(device, dtype)
    with isolated_rng(device):
        try:
            for batch in val_loader:
                batch = batch.to(device, non_blocking=True)
                with ctx:
                    dets = model.predict(batch)
                keep = [i for i, image_id in enumerate(batch.image_ids) if int(image_id) >= 0]  # drop padding
                if not keep:
                    continue
                ids = [int(batch.image_ids[i]) for i in keep]
                evaluator.update(ids, [dets[i].to("cpu") for i in keep])
                sizes_wh = [(int(batch.orig_sizes[i][1]), int(batch.orig_sizes[i][0])) for i in keep]
                evaluator.add_targets(ids, sizes_wh, [target_to_original(batch, i) for i in keep])
        finally:
            if was_training:
                model.train()
    evaluator.synchronize()
    flat: dict[str, Any] | None = None
    metrics = None
    if is_main:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = evaluator.compute()
        for w in caught:
            console.print(f"[yellow]warning:[/] {w.message}", highlight=False)
        metrics.print(console=console, per_class=per_class)
        flat = metrics.as_dict(per_class=False)
    flat = du.broadcast_object(flat)
    if metrics is None and flat is not None:
        stats = [flat[n] for n in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10",
                                   f"AR{flat['max_dets']}", "ARs", "ARm", "ARl")]
        metrics = CocoMetrics.from_stats(stats, max_dets=flat["max_dets"], backend=flat["backend"],
                                         num_images=flat["num_images"], num_detections=flat["num_detections"])
    return metrics, flat
