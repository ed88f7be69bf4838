"""The one detector class behind every recipe.

``Detector`` wires a backbone, a neck, a :class:`~codetr.core.interfaces.DETRVariant` and its set
criterion, plus (for Co-DETR) K auxiliary heads, the multi-scale adapter and a query encoder::

    images ─backbone─> C_l ─neck─> levels ─variant─> Memory ─> main (+dn) groups ─decode─> criterion
                                               └─adapter─> pyramid ─aux heads─> losses + PositiveCoords
                                                                        └─query encoder─> aux groups ─decode─> losses

A jointly decoded group (DINO: denoising + matching queries) is split back into its parts by
``variant.split_outputs``: the "main" part goes to the criterion, the others to ``variant.group_loss``.

``loss(batch)`` returns a flat dict of already-weighted loss terms (the engine sums them);
``predict(batch)`` returns :class:`~codetr.core.structures.Detections` in the original image frame.
Only the DETR branch runs at inference (unless ``eval_module`` selects an aux head for analysis).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from codetr.core.interfaces import Criterion, DETRVariant, Memory
from codetr.core.structures import Batch, Detections, level_masks

__all__ = ["Detector", "rescale_detections"]


def _has_padding(batch: Batch) -> bool:
    """True when some image of the batch does not fill the padded canvas."""
    h, w = batch.images.shape[-2:]
    return bool(((batch.image_sizes[:, 0] != h) | (batch.image_sizes[:, 1] != w)).any())


def rescale_detections(det: Detections, size_hw: Tensor, orig_hw: Tensor) -> Detections:
    """Network-input frame (valid size ``size_hw``) -> original image frame (``orig_hw``), clipped."""
    h, w = size_hw.tolist()
    oh, ow = orig_hw.tolist()
    scale = det.boxes.new_tensor([ow / w, oh / h, ow / w, oh / h])
    boxes = det.boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
    return Detections(boxes, det.scores, det.labels)


class Detector(nn.Module):
    """Backbone + neck + DETR variant + criterion (+ collaborative aux branch).

    Args:
        backbone: module returning a list of (B, C_l, H_l, W_l) maps; has ``strides``.
        neck: module mapping those maps to ``num_levels`` maps of ``hidden_dim`` channels; has ``out_strides``.
        variant: the DETR variant.
        criterion: a :class:`~codetr.core.interfaces.Criterion`, normally (an ``nn.Module``)
            :class:`~codetr.heads.criterion.SetCriterion` (one-to-one losses, fixed-target losses).
        postprocess: ``(DecoderOutputs, image_sizes, orig_sizes) -> list[Detections]`` (original frame).
        collaborative: optional Co-DETR branch (``codetr.heads.collaborative.CollaborativeBranch``) with
            ``loss(memory, batch, variant, criterion) -> dict`` and ``predict(memory, batch)``.
        eval_module: ``detr`` (default) or an aux head (``one-stage`` / ``two-stage``) for analysis.
        score_threshold: detections below it are dropped by ``predict``.
        exact_padding: at inference, compute backbone + neck per image (see ``_features_per_image``).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, variant: DETRVariant, criterion: Criterion,
                 postprocess: Callable[..., list[Detections]], num_classes: int,
                 collaborative: nn.Module | None = None, eval_module: str = "detr",
                 score_threshold: float = 0.0, exact_padding: bool = True):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.variant = variant
        self.criterion = criterion
        self.collaborative = collaborative
        self.postprocess = postprocess
        self.num_classes = num_classes
        self.eval_module = eval_module
        self.score_threshold = score_threshold
        self.exact_padding = exact_padding

    # ------------------------------------------------------------------ shared trunk
    def encode(self, batch: Batch) -> Memory:
        if self.exact_padding and not self.training and _has_padding(batch):
            levels, masks = self._features_per_image(batch)
        else:
            levels = self.neck(self.backbone(batch.images))
            masks = level_masks(batch.masks, [tuple(x.shape[-2:]) for x in levels])
        levels, masks = pad_to_min_tokens(levels, masks, list(self.neck.out_strides), self.variant.min_tokens)
        inputs = self.variant.prepare(levels, masks, list(self.neck.out_strides))
        return self.variant.encode(inputs)

    def _features_per_image(self, batch: Batch) -> tuple[list[Tensor], list[Tensor]]:
        """Backbone + neck on each image at its own size, then padded per level (True = padding).

        Convolutions and normalisation layers let padded pixels leak into the valid area, so a padded
        batch would not give the same features as each image alone. Running the CNN per image and
        padding the *feature maps* makes inference exactly independent of batch composition (the
        transformer is already masked). Used in eval mode (``exact_padding``); training keeps the
        official batched computation.
        """
        per_image = []
        for i, (h, w) in enumerate(batch.image_sizes.tolist()):
            per_image.append(self.neck(self.backbone(batch.images[i:i + 1, :, :h, :w])))
        levels, masks = [], []
        for lvl in range(len(per_image[0])):
            maps = [f[lvl] for f in per_image]
            hh, ww = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
            out = maps[0].new_zeros(len(maps), maps[0].shape[1], hh, ww)
            mask = torch.ones(len(maps), hh, ww, dtype=torch.bool, device=out.device)
            for i, m in enumerate(maps):
                out[i, :, :m.shape[-2], :m.shape[-1]] = m[0]
                mask[i, :m.shape[-2], :m.shape[-1]] = False
            levels.append(out)
            masks.append(mask)
        return levels, masks

    # ------------------------------------------------------------------ training
    def loss(self, batch: Batch) -> dict[str, Tensor]:
        memory = self.encode(batch)
        groups = self.variant.make_queries(memory, batch)
        losses: dict[str, Tensor] = {}
        for group in groups:
            outputs = self.variant.decode(group, memory)
            for part, part_out in self.variant.split_outputs(group, outputs):
                if part.name == "main":
                    losses.update(self.criterion(part_out, batch, memory.extras))
                else:
                    losses.update(self.variant.group_loss(part, part_out, batch, self.criterion))
        if self.collaborative is not None:
            losses.update(self.collaborative.loss(memory, batch, self.variant, self.criterion))
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, batch: Batch) -> list[Detections]:
        memory = self.encode(batch)
        if self.eval_module != "detr" and self.collaborative is not None:
            dets = self.collaborative.predict(memory, batch, self.eval_module)
            dets = [rescale_detections(d, s, o) for d, s, o in zip(dets, batch.image_sizes, batch.orig_sizes)]
        else:
            main = self.variant.make_queries(memory, None)[0]
            parts = self.variant.split_outputs(main, self.variant.decode(main, memory))
            out = next((o for p, o in parts if p.name == "main"), parts[0][1])
            dets = self.postprocess(out, batch.image_sizes, batch.orig_sizes)
        if self.score_threshold > 0:
            dets = [d.filter(d.scores >= self.score_threshold) for d in dets]
        return dets


def pad_to_min_tokens(levels: list[Tensor], masks: list[Tensor], strides: list[int], min_tokens: int
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """Pad tiny feature pyramids with masked zeros until they hold ``min_tokens`` tokens.

    A two-stage variant ranks every encoder token and keeps its top ``num_proposals``; an image of a few
    pixels (e.g. 33 px with strides 16..64: 14 tokens for 20 proposals) has fewer. Each level l grows by
    ``t * max(strides) / strides[l]`` cells on the bottom and right (the pyramid's 2x relation kept), the
    smallest t that suffices; the new cells are padding (mask True), like bottom/right image padding.
    Maps (B, C, H_l, W_l), masks (B, H_l, W_l) True on padding; unchanged when there are enough tokens.
    """
    total = sum(x.shape[-2] * x.shape[-1] for x in levels)
    if total >= min_tokens or not levels:
        return levels, masks
    top = max(strides)
    grow = [max(1, top // s) for s in strides]
    t = 1
    while sum((x.shape[-2] + t * g) * (x.shape[-1] + t * g) for x, g in zip(levels, grow)) < min_tokens:
        t += 1
    out_l, out_m = [], []
    for x, m, g in zip(levels, masks, grow):
        p = t * g
        out_l.append(torch.nn.functional.pad(x, (0, p, 0, p)))
        out_m.append(torch.nn.functional.pad(m, (0, p, 0, p), value=True))
    return out_l, out_m
