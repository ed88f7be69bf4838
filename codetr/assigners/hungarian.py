"""One-to-one Hungarian assigner (DETR-family set matching).

Matching cost of prediction ``q`` against ground truth ``n`` (all weights configurable)::

    C[q, n] = cost_class * class_cost(q, label_n)
            + cost_bbox  * || box_q - gt_n ||_1          (normalised cxcywh)
            - cost_giou  * GIoU(xyxy(box_q), xyxy(gt_n))  (pixels when the image size is given)

``class_cost`` is

* ``"focal"`` (Deformable-DETR, DINO, Co-DETR, MMDetection ``FocalLossCost``): with ``p = sigmoid(logit)``,
  ``alpha (1-p)^gamma (-log(p + eps)) - (1-alpha) p^gamma (-log(1 - p + eps))`` at the GT class.
  ``focal_eps`` is 1e-8 in the Deformable-DETR / DINO / detrex matchers and 1e-12 in MMDetection's
  ``FocalLossCost`` (the official Co-DETR code); the difference only shows for p within ~1e-8 of 0 or 1.
* ``"softmax"`` (plain DETR): ``-softmax(logits)[label]``.

GIoU is invariant to per-axis scaling, so pixels vs normalised only changes rounding; computing it in
pixels follows MMDetection's ``IoUCost`` on un-normalised boxes.

The costs are computed on the tensors' device (no grad), moved to the CPU **once** (per image in
:meth:`HungarianAssigner.match`, per batch in :meth:`HungarianAssigner.match_batch`) and solved with
``scipy.optimize.linear_sum_assignment``.

Edge cases:

* ``N == 0`` or ``Q == 0``: empty :class:`MatchResult`.
* ``Q < N``: the rectangular problem is solved as is, so ``min(Q, N)`` pairs are returned and ``N - Q``
  ground-truth objects stay unmatched (they contribute no loss). No error: this only happens with
  tiny query counts or crowded images, and the official MMDetection assigner behaves the same way.
* Non-finite costs (NaN/inf logits or boxes, degenerate boxes giving 0/0 in the GIoU) would make scipy
  raise ``ValueError: matrix contains invalid numeric entries``; they are replaced by
  :data:`INVALID_COST` and a ``RuntimeWarning`` names which cost term and which input was non-finite.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

from codetr.core.interfaces import MatchResult, OneToOneAssigner
from codetr.core.registry import Component, ComponentConfig

__all__ = ["HungarianAssignerConfig", "HungarianAssigner", "INVALID_COST", "build", "COMPONENT"]

INVALID_COST: float = 1e8
"""Cost substituted for non-finite entries (far above any finite cost, so such pairs are avoided)."""


class HungarianAssignerConfig(ComponentConfig):
    """Weights of the Hungarian matching cost (defaults: the Deformable-DETR / Co-DETR 2 / 5 / 2)."""

    type: Literal["hungarian"] = "hungarian"
    cost_class: float = Field(2.0, ge=0)
    cost_class_type: Literal["focal", "softmax"] = "focal"
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    focal_eps: float = Field(1e-8, ge=0, description="1e-8: Deformable-DETR/DINO; 1e-12: MMDetection (Co-DETR)")
    cost_bbox: float = Field(5.0, ge=0, description="L1 on normalised cxcywh")
    cost_giou: float = Field(2.0, ge=0)


def focal_class_cost(logits: Tensor, gt_labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                     eps: float = 1e-8) -> Tensor:
    """(Q, C) logits, (N,) labels -> (Q, N) focal classification cost (unweighted)."""
    p = logits[:, gt_labels].sigmoid()
    pos = alpha * (1 - p).pow(gamma) * (-(p + eps).log())
    neg = (1 - alpha) * p.pow(gamma) * (-(1 - p + eps).log())
    return pos - neg


def softmax_class_cost(logits: Tensor, gt_labels: Tensor) -> Tensor:
    """(Q, C) logits, (N,) labels -> (Q, N) ``-softmax(logits)[:, label]``."""
    return -logits.softmax(-1)[:, gt_labels]


def _empty(device: torch.device | str | None = None) -> MatchResult:
    z = torch.zeros(0, dtype=torch.int64, device=device)
    return MatchResult(pred_idx=z, gt_idx=z.clone())


class HungarianAssigner(OneToOneAssigner):
    """Optimal one-to-one matching of Q predictions to N ground-truth objects of one image."""

    def __init__(self, cfg: HungarianAssignerConfig | None = None) -> None:
        self.cfg = cfg or HungarianAssignerConfig()

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HungarianAssigner(class={c.cost_class}[{c.cost_class_type}], bbox={c.cost_bbox}, "
                f"giou={c.cost_giou})")

    # ------------------------------------------------------------------ costs
    def _terms(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
               image_size_hw: Tensor | None) -> dict[str, Tensor]:
        c = self.cfg
        logits, boxes, gt_boxes = logits.float(), boxes.float(), gt_boxes.float()
        gt_labels = gt_labels.long()
        terms: dict[str, Tensor] = {}
        if c.cost_class:
            if c.cost_class_type == "focal":
                cls = focal_class_cost(logits, gt_labels, c.focal_alpha, c.focal_gamma, c.focal_eps)
            else:
                cls = softmax_class_cost(logits, gt_labels)
            terms["class"] = c.cost_class * cls
        if c.cost_bbox:
            terms["bbox"] = c.cost_bbox * torch.cdist(boxes, gt_boxes, p=1)
        if c.cost_giou:
            pred_xyxy = box_convert(boxes, "cxcywh", "xyxy")
            gt_xyxy = box_convert(gt_boxes, "cxcywh", "xyxy")
            if image_size_hw is not None:
                h, w = image_size_hw.to(boxes.device, torch.float32).unbind(-1)
                scale = torch.stack([w, h, w, h])
                pred_xyxy, gt_xyxy = pred_xyxy * scale, gt_xyxy * scale
            terms["giou"] = -c.cost_giou * generalized_box_iou(pred_xyxy, gt_xyxy)
        return terms

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                    image_size_hw: Tensor | None = None) -> Tensor:
        """(Q, N) total matching cost on the inputs' device (float32, no grad)."""
        terms = self._terms(logits, boxes, gt_labels, gt_boxes, image_size_hw)
        if not terms:
            return boxes.new_zeros(boxes.shape[0], gt_boxes.shape[0], dtype=torch.float32)
        return sum(terms.values())  # type: ignore[return-value]

    # ------------------------------------------------------------------ solving
    def _solve(self, cost_cpu: Tensor, inputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]
               ) -> tuple[np.ndarray, np.ndarray]:
        cost = cost_cpu.numpy()
        if not np.isfinite(cost).all():
            warnings.warn(self._diagnose(cost, inputs), RuntimeWarning, stacklevel=3)
            cost = np.where(np.isfinite(cost), cost, INVALID_COST)
        rows, cols = linear_sum_assignment(cost)
        return rows, cols

    def _diagnose(self, cost: np.ndarray, inputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]) -> str:
        """Name the cost term(s) and input(s) responsible for non-finite costs (rare path, may sync)."""
        logits, boxes, gt_labels, gt_boxes, size = inputs
        n_bad = int((~np.isfinite(cost)).sum())
        with torch.no_grad():
            terms = self._terms(logits, boxes, gt_labels, gt_boxes, size)
            bad_terms = [k for k, t in terms.items() if not bool(torch.isfinite(t).all())]
            bad_inputs = [name for name, t in (("logits", logits), ("pred boxes", boxes), ("gt boxes", gt_boxes))
                          if not bool(torch.isfinite(t.float()).all())]
        cause = f"non-finite {', '.join(bad_inputs)}" if bad_inputs else (
            "degenerate (zero-area) boxes in the GIoU (0/0)" if "giou" in bad_terms else "overflow")
        return (f"HungarianAssigner: {n_bad} of {cost.size} matching costs are not finite "
                f"(term(s): {', '.join(bad_terms) or '?'}; cause: {cause}); replaced by {INVALID_COST:g}. "
                "Check the learning rate / AMP settings and the dataset boxes.")

    def match(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
              image_size_hw: Tensor | None = None) -> MatchResult:
        """Match one image (see :class:`OneToOneAssigner`); indices are returned on ``logits.device``,
        sorted by prediction index; ``min(Q, N)`` pairs."""
        q, n = boxes.shape[0], gt_boxes.shape[0]
        if q == 0 or n == 0:
            return _empty(logits.device)
        cost = self.cost_matrix(logits, boxes, gt_labels, gt_boxes, image_size_hw).cpu()
        rows, cols = self._solve(cost, (logits, boxes, gt_labels, gt_boxes, image_size_hw))
        return MatchResult(pred_idx=torch.as_tensor(rows, dtype=torch.int64).to(logits.device),
                           gt_idx=torch.as_tensor(cols, dtype=torch.int64).to(logits.device))

    @torch.no_grad()
    def match_batch(self, logits: Tensor, boxes: Tensor, gt_labels: list[Tensor], gt_boxes: list[Tensor],
                    image_sizes: Tensor | None = None) -> list[MatchResult]:
        """Match B images with a single device-to-host copy of all cost matrices.

        Args:
            logits: (B, Q, C); boxes: (B, Q, 4) normalised cxcywh.
            gt_labels / gt_boxes: B tensors (N_b,) / (N_b, 4) normalised cxcywh.
            image_sizes: (B, 2) valid (h, w), or None (GIoU cost on normalised boxes).

        Returns:
            B :class:`MatchResult` with **CPU** int64 indices (the caller moves what it needs once).
        """
        b, q = boxes.shape[:2]
        costs, shapes = [], []
        for i in range(b):
            n = gt_boxes[i].shape[0]
            shapes.append((q, n))
            if q and n:
                size = None if image_sizes is None else image_sizes[i]
                costs.append(self.cost_matrix(logits[i], boxes[i], gt_labels[i], gt_boxes[i], size).reshape(-1))
        flat = torch.cat(costs).cpu() if costs else torch.zeros(0)
        out, start = [], 0
        for i, (qq, n) in enumerate(shapes):
            if qq == 0 or n == 0:
                out.append(_empty())
                continue
            cost = flat[start:start + qq * n].view(qq, n)
            start += qq * n
            size = None if image_sizes is None else image_sizes[i]
            rows, cols = self._solve(cost, (logits[i], boxes[i], gt_labels[i], gt_boxes[i], size))
            out.append(MatchResult(pred_idx=torch.as_tensor(rows, dtype=torch.int64),
                                   gt_idx=torch.as_tensor(cols, dtype=torch.int64)))
        return out


def build(cfg: HungarianAssignerConfig) -> HungarianAssigner:
    return HungarianAssigner(cfg)


COMPONENT = Component(
    config=HungarianAssignerConfig,
    build=build,
    summary="One-to-one Hungarian matching (focal/softmax class + L1 + GIoU cost), scipy on CPU",
)
