"""SimOTA-style dynamic-k assigner as a codetr plugin (see README.md)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torchvision.ops import box_iou

from codetr.core.interfaces import AssignResult, OneToManyAssigner
from codetr.core.registry import Component, ComponentConfig

__all__ = ["SimOTAConfig", "SimOTAAssigner", "COMPONENT"]


class SimOTAConfig(ComponentConfig):
    type: Literal["simota"] = "simota"
    center_radius: float = Field(2.5, gt=0, description="candidate radius around the GT centre, in strides")
    candidate_topk: int = Field(10, ge=1, description="top IoUs summed to get each GT's dynamic k")
    iou_weight: float = Field(3.0, ge=0)
    cls_weight: float = Field(1.0, ge=0)


class SimOTAAssigner(OneToManyAssigner):
    """Dynamic-k assignment (see README.md). Prediction-aware: heads pass their detached scores and boxes."""

    uses_predictions = True

    def __init__(self, cfg: SimOTAConfig):
        self.cfg = cfg

    def assign(self, anchors_xyxy: Tensor, num_per_level: list[int], gt_boxes_xyxy: Tensor, gt_labels: Tensor,
               num_classes: int, pred_scores: Tensor | None = None, pred_boxes_xyxy: Tensor | None = None,
               ignore_boxes_xyxy: Tensor | None = None) -> AssignResult:
        num_anchors, num_gt = anchors_xyxy.shape[0], gt_boxes_xyxy.shape[0]
        device = anchors_xyxy.device
        gt_index = torch.full((num_anchors,), -1, dtype=torch.long, device=device)
        labels = torch.full((num_anchors,), num_classes, dtype=torch.long, device=device)
        max_iou = torch.zeros(num_anchors, device=device)
        if num_gt == 0 or num_anchors == 0:
            return AssignResult(gt_index, max_iou, labels)

        # anchor stride: the anchor side is 8 * stride for codetr's one-anchor heads; use its size.
        sizes = (anchors_xyxy[:, 2:] - anchors_xyxy[:, :2]).clamp(min=1e-6)
        centers = (anchors_xyxy[:, :2] + anchors_xyxy[:, 2:]) / 2
        strides = sizes.mean(dim=1, keepdim=True) / 8.0
        gt_centers = (gt_boxes_xyxy[:, :2] + gt_boxes_xyxy[:, 2:]) / 2

        inside_box = ((centers[:, None, :] > gt_boxes_xyxy[None, :, :2])
                      & (centers[:, None, :] < gt_boxes_xyxy[None, :, 2:])).all(-1)
        radius = self.cfg.center_radius * strides
        inside_center = ((centers[:, None, :] - gt_centers[None]).abs() < radius[:, None, :]).all(-1)
        candidate = inside_box | inside_center  # (A, G)

        boxes = pred_boxes_xyxy if pred_boxes_xyxy is not None else anchors_xyxy
        ious = box_iou(boxes, gt_boxes_xyxy)  # (A, G)
        cost = self.cfg.iou_weight * -torch.log(ious + 1e-8)
        if pred_scores is not None:
            p = pred_scores[:, gt_labels].clamp(1e-6, 1 - 1e-6)  # (A, G)
            cost = cost + self.cfg.cls_weight * F.binary_cross_entropy(p, ious.detach(), reduction="none")
        cost = cost + 1e5 * (~candidate)

        topk = min(self.cfg.candidate_topk, num_anchors)
        dynamic_k = ious.topk(topk, dim=0).values.sum(0).int().clamp(min=1)  # (G,)
        matching = torch.zeros_like(cost, dtype=torch.bool)
        for g in range(num_gt):
            k = int(dynamic_k[g])
            idx = cost[:, g].topk(k, largest=False).indices
            matching[idx, g] = True
        matching &= candidate
        claimed = matching.sum(1)
        multiple = claimed > 1
        if multiple.any():
            best = cost[multiple].argmin(1)
            matching[multiple] = False
            matching[multiple.nonzero(as_tuple=True)[0], best] = True
        pos = matching.any(1)
        gt_of = matching.float().argmax(1)
        gt_index[pos] = gt_of[pos]
        labels[pos] = gt_labels[gt_of[pos]]
        max_iou = ious.max(1).values
        max_iou[pos] = ious[pos, gt_of[pos]]
        return AssignResult(gt_index, max_iou, labels)


def build_simota(cfg: SimOTAConfig) -> SimOTAAssigner:
    return SimOTAAssigner(cfg)


COMPONENT = Component(config=SimOTAConfig, build=build_simota,
                      summary="SimOTA dynamic-k assignment (example plugin)")
