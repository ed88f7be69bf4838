"""Region Proposal Network parts of the Faster R-CNN auxiliary head (MMDetection ``RPNHead`` semantics).

* :class:`RPNConvHead`: shared 3x3 conv + ReLU, then 1x1 ``rpn_cls`` (A sigmoid logits per location)
  and 1x1 ``rpn_reg`` (4A deltas), applied to every pyramid level. Parameter names equal the official
  ``rpn_head.*`` keys.
* :func:`rpn_proposals`: MMDetection 2.x ``RPNHead._get_bboxes_single`` for one image: per level the
  ``nms_pre`` best anchors by sigmoid score (full ``sort``, as the official code), decode (clipped to
  the valid image), drop boxes with ``w <= min_bbox_size`` or ``h <= min_bbox_size``, class-aware NMS
  across levels with the level index as the class (MMCV ``batched_nms``), keep ``max_per_img``.

Order conventions: per level, scores/deltas are flattened as ``permute(1, 2, 0)`` i.e. location-major
(row-major y, x) with the anchor index fastest, the same order as
:meth:`codetr.heads.anchors.AnchorGenerator.level_anchors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.heads.box_coder import DeltaXYWHCoder
from codetr.ops.nms import batched_nms

__all__ = ["RPNConvHead", "ProposalSettings", "rpn_proposals"]


class RPNConvHead(nn.Module):
    """3x3 conv (``rpn_conv``) + ReLU + 1x1 ``rpn_cls`` (A) / ``rpn_reg`` (4A); Normal(0, 0.01) init."""

    def __init__(self, in_channels: int, feat_channels: int, num_anchors: int):
        super().__init__()
        self.num_anchors = num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, maps: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """L maps (B, C, H, W) -> (cls logits L x (B, A, H, W), deltas L x (B, 4A, H, W))."""
        cls, reg = [], []
        for x in maps:
            x = F.relu(self.rpn_conv(x))
            cls.append(self.rpn_cls(x))
            reg.append(self.rpn_reg(x))
        return cls, reg


@dataclass(frozen=True)
class ProposalSettings:
    nms_pre: int
    max_per_img: int
    iou_threshold: float
    min_bbox_size: float = 0.0


@torch.no_grad()
def rpn_proposals(cls_scores: list[Tensor], bbox_preds: list[Tensor], anchors: list[Tensor],
                  image_size_hw: tuple[int, int], coder: DeltaXYWHCoder, cfg: ProposalSettings) -> Tensor:
    """Proposals of one image (detached).

    Args:
        cls_scores: L tensors (A, H, W) logits of this image.
        bbox_preds: L tensors (4A, H, W) deltas of this image.
        anchors: L tensors (H * W * A, 4) xyxy anchors (all of them, valid or not, as the official code).
        image_size_hw: valid (h, w) used to clip the decoded boxes.

    Returns:
        (K, 5) float32 ``[x1, y1, x2, y2, score]`` sorted by decreasing score, K <= ``max_per_img``
        (computed in float32 even under autocast).
    """
    mlvl_scores, mlvl_deltas, mlvl_anchors, mlvl_ids = [], [], [], []
    for lvl, (c, r, a) in enumerate(zip(cls_scores, bbox_preds, anchors)):
        scores = c.detach().float().permute(1, 2, 0).reshape(-1).sigmoid()
        deltas = r.detach().float().permute(1, 2, 0).reshape(-1, 4)
        if 0 < cfg.nms_pre < scores.shape[0]:
            ranked, order = scores.sort(descending=True)
            order = order[:cfg.nms_pre]
            scores = ranked[:cfg.nms_pre]
            deltas = deltas[order]
            a = a[order]
        mlvl_scores.append(scores)
        mlvl_deltas.append(deltas)
        mlvl_anchors.append(a)
        mlvl_ids.append(torch.full((scores.shape[0],), lvl, dtype=torch.long, device=scores.device))
    scores = torch.cat(mlvl_scores)
    boxes = coder.decode(torch.cat(mlvl_anchors).float(), torch.cat(mlvl_deltas), max_shape=image_size_hw)
    ids = torch.cat(mlvl_ids)
    if cfg.min_bbox_size >= 0:
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        valid = (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
        if not bool(valid.all()):
            boxes, scores, ids = boxes[valid], scores[valid], ids[valid]
    if boxes.numel() == 0:
        return boxes.new_zeros(0, 5)
    keep, kept_scores = batched_nms(boxes, scores, ids, cfg.iou_threshold)
    keep, kept_scores = keep[:cfg.max_per_img], kept_scores[:cfg.max_per_img]
    return torch.cat([boxes[keep], kept_scores[:, None]], dim=-1)
