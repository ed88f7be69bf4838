"""DETR-style inference post-processing (sigmoid / focal heads; optional soft-NMS for Co-DINO).

Matches the official Deformable-DETR / Co-Deformable-DETR (mmdet 2.x ``DETRHead._get_bboxes_single``) and
mmdet 3.x ``DeformableDETRHead._predict_by_feat_single``: sigmoid scores, top-k over the flattened
``Q x C`` (query, class) pairs in descending score order, ``label = idx % C``, ``query = idx // C``; boxes
cxcywh -> xyxy in pixels of the valid image, **clamped to the valid image**, then rescaled to the original
image by dividing by the resize factor ``image_size / orig_size``.

Optional soft-NMS (Co-DINO COCO configs, ``model.test.soft_nms``): MMDetection 3.x ``CoDINOHead`` order --
top-``topk`` first, then class-aware soft-NMS (MMCV linear decay, IoU threshold 0.8, ``min_score`` 1e-3) on
the boxes **in the original image frame**, scores replaced by the decayed ones, soft-NMS output order, and
the first ``max_per_image`` kept. The Sense-X (mmdet 2) order is obtained with ``topk = num_queries`` (900)
and ``max_per_image = 300``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from codetr.core.interfaces import DecoderOutputs
from codetr.core.structures import Detections, cxcywh_to_xyxy
from codetr.ops.soft_nms import batched_soft_nms

__all__ = ["postprocess", "apply_soft_nms"]


def postprocess(outputs: DecoderOutputs | tuple[Tensor, Tensor], image_sizes: Tensor, orig_sizes: Tensor,
                topk: int = 100, soft_nms: Any | None = None) -> list[Detections]:
    """Detections in the original image frame.

    Args:
        outputs: decoder outputs (the **last** layer is used), or a ``(logits (B, Q, C), boxes (B, Q, 4))``
            pair of one layer (boxes normalised cxcywh relative to the valid image).
        image_sizes: (B, 2) valid (h, w) of each image in the network-input frame (``Batch.image_sizes``).
        orig_sizes: (B, 2) (h, w) of the original images (``Batch.orig_sizes``).
        topk: detections per image (official Deformable / Co-Deformable: 100; DINO / Co-DINO: 300).
        soft_nms: None, or settings with ``method`` ("linear" | "gaussian"), ``iou_threshold``, ``sigma``,
            ``max_per_image`` and optionally ``min_score`` (default 1e-3), e.g. the recipe's
            ``model.test.soft_nms`` (:class:`codetr.core.config.schema.SoftNMSConfig`).
    """
    if isinstance(outputs, DecoderOutputs):
        logits, boxes = outputs.logits[-1], outputs.boxes[-1]
    else:
        logits, boxes = outputs
    b, q, c = logits.shape
    k = min(topk, q * c)
    scores, idx = logits.sigmoid().reshape(b, -1).topk(k, dim=1)
    labels = idx % c
    query = idx // c
    sel = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))
    xyxy = cxcywh_to_xyxy(sel)
    h = image_sizes[:, 0].to(xyxy.dtype)
    w = image_sizes[:, 1].to(xyxy.dtype)
    x = (xyxy[..., 0::2] * w[:, None, None]).clamp(min=0)
    y = (xyxy[..., 1::2] * h[:, None, None]).clamp(min=0)
    x = torch.minimum(x, w[:, None, None])
    y = torch.minimum(y, h[:, None, None])
    # Resize factor computed in float64 then rounded to float32, and divided (not multiplied by the inverse),
    # as mmdet does with its ``scale_factor``.
    fx = (image_sizes[:, 1].double() / orig_sizes[:, 1].double()).to(xyxy.dtype)
    fy = (image_sizes[:, 0].double() / orig_sizes[:, 0].double()).to(xyxy.dtype)
    x = x / fx[:, None, None]
    y = y / fy[:, None, None]
    out = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)
    dets = [Detections(boxes=out[i], scores=scores[i], labels=labels[i]) for i in range(b)]
    if soft_nms is not None:
        dets = [apply_soft_nms(d, soft_nms) for d in dets]
    return dets


def apply_soft_nms(det: Detections, cfg: Any) -> Detections:
    """Class-aware soft-NMS of one image's detections (MMCV ``batched_nms`` with ``soft_nms``), then the first
    ``cfg.max_per_image`` in soft-NMS order with their decayed scores."""
    if det.boxes.numel() == 0:
        return det
    keep, scores = batched_soft_nms(det.boxes, det.scores, det.labels, iou_threshold=cfg.iou_threshold,
                                    sigma=getattr(cfg, "sigma", 0.5), min_score=getattr(cfg, "min_score", 1e-3),
                                    method=getattr(cfg, "method", "linear"))
    n = int(getattr(cfg, "max_per_image", keep.numel()))
    keep, scores = keep[:n], scores[:n]
    return Detections(boxes=det.boxes[keep], scores=scores, labels=det.labels[keep])
