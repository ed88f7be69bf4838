"""Random positive/negative sampling of assigned boxes (MMDetection ``RandomSampler`` semantics).

``RandomSampler(num, pos_fraction)`` keeps at most ``int(num * pos_fraction)`` positives and fills up to
``num`` with negatives (optionally capped at ``neg_pos_ub * max(1, #pos)``), each drawn uniformly
without replacement. With ``add_gt_as_proposals`` the GT boxes are prepended to the candidates as
positives of themselves (IoU 1) before sampling.

RNG: a subset is drawn as ``torch.randperm(len(gallery), generator=g)[:k]`` on the CPU (the global
default generator when ``g`` is None), once for the positives (only when there are more than allowed)
and then once for the negatives (only when there are more than needed) -- exactly MMDetection's
consumption, so ``torch.manual_seed(s)`` followed by the same sequence of ``sample`` calls draws the
same subsets as the official code. The sampled indices are returned **sorted** (MMDetection calls
``unique()`` on them), positives first in :attr:`SamplingResult.boxes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from codetr.core.interfaces import AssignResult

__all__ = ["SamplingResult", "RandomSampler", "add_gt_to_assign_result"]


@dataclass
class SamplingResult:
    """Sampled candidates of one image.

    Attributes:
        pos_inds / neg_inds: (P,) / (Q,) int64 sorted indices into the candidate list (which starts
            with the GT boxes when they were added as proposals).
        pos_boxes / neg_boxes: (P, 4) / (Q, 4) xyxy candidate boxes.
        pos_gt_boxes: (P, 4) xyxy GT box assigned to each positive.
        pos_labels: (P,) int64 class of each positive.
        pos_assigned_gt_inds: (P,) int64 0-based GT index of each positive.
        pos_is_gt: (P,) bool, True where the positive is a GT box added as a proposal.
        num_gts: number of GT boxes of the image.
    """

    pos_inds: Tensor
    neg_inds: Tensor
    pos_boxes: Tensor
    neg_boxes: Tensor
    pos_gt_boxes: Tensor
    pos_labels: Tensor
    pos_assigned_gt_inds: Tensor
    pos_is_gt: Tensor
    num_gts: int

    @property
    def boxes(self) -> Tensor:
        """(P + Q, 4) positives then negatives (MMDetection ``SamplingResult.bboxes``)."""
        return torch.cat([self.pos_boxes, self.neg_boxes], 0)

    @property
    def num_pos(self) -> int:
        return int(self.pos_inds.numel())

    @property
    def num_neg(self) -> int:
        return int(self.neg_inds.numel())


def add_gt_to_assign_result(result: AssignResult, gt_labels: Tensor) -> AssignResult:
    """Prepend the N GT boxes as positives of themselves (IoU 1, their own labels)."""
    n = int(gt_labels.numel())
    dev = result.gt_index.device
    return AssignResult(
        gt_index=torch.cat([torch.arange(n, dtype=torch.long, device=dev), result.gt_index]),
        max_iou=torch.cat([result.max_iou.new_ones(n), result.max_iou]),
        labels=torch.cat([gt_labels.to(device=dev, dtype=torch.long), result.labels]),
    )


class RandomSampler:
    """Uniform random sampling of positives and negatives; see the module docstring.

    Args:
        num: total number of samples per image.
        pos_fraction: upper bound of the positive share (``int(num * pos_fraction)`` positives at most).
        neg_pos_ub: if >= 0, at most ``neg_pos_ub * max(1, #pos)`` negatives.
        add_gt_as_proposals: prepend the GT boxes to the candidates as positives.
    """

    def __init__(self, num: int, pos_fraction: float, neg_pos_ub: float = -1,
                 add_gt_as_proposals: bool = True):
        self.num = int(num)
        self.pos_fraction = float(pos_fraction)
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = add_gt_as_proposals

    @staticmethod
    def random_choice(gallery: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
        """``num`` elements of ``gallery`` drawn without replacement (MMDetection ``random_choice``)."""
        assert gallery.numel() >= num
        dev = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(gallery.numel(), generator=generator, device=dev)[:num].to(gallery.device)
        return gallery[perm]

    def _sample(self, mask: Tensor, num_expected: int, generator: torch.Generator | None) -> Tensor:
        inds = torch.nonzero(mask, as_tuple=False).view(-1)
        if inds.numel() <= num_expected:
            return inds
        return self.random_choice(inds, num_expected, generator)

    def sample(self, assign_result: AssignResult, proposals: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor | None = None, generator: torch.Generator | None = None) -> SamplingResult:
        """Sample one image's assigned candidates.

        Args:
            assign_result: assignment of ``proposals`` (before GT boxes are added).
            proposals: (A, 4+) xyxy candidates (extra columns such as scores are dropped).
            gt_boxes: (N, 4) xyxy GT boxes the assignment refers to.
            gt_labels: (N,) int64, required when ``add_gt_as_proposals`` (None = class-agnostic, label 0).
            generator: CPU ``torch.Generator``; None uses the global RNG (official behaviour).
        """
        boxes = proposals[:, :4]
        gt_flags = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        if self.add_gt_as_proposals and gt_boxes.shape[0] > 0:
            labels = gt_labels if gt_labels is not None else gt_boxes.new_zeros(gt_boxes.shape[0], dtype=torch.long)
            boxes = torch.cat([gt_boxes.to(boxes), boxes], 0)
            assign_result = add_gt_to_assign_result(assign_result, labels)
            gt_flags = torch.cat([torch.ones(gt_boxes.shape[0], dtype=torch.bool, device=boxes.device), gt_flags])

        num_expected_pos = int(self.num * self.pos_fraction)
        pos_inds = self._sample(assign_result.gt_index >= 0, num_expected_pos, generator).unique()
        num_pos = pos_inds.numel()
        num_expected_neg = self.num - num_pos
        if self.neg_pos_ub >= 0:
            bound = int(self.neg_pos_ub * max(1, num_pos))
            num_expected_neg = min(num_expected_neg, bound)
        neg_inds = self._sample(assign_result.gt_index == -1, num_expected_neg, generator).unique()

        assigned = assign_result.gt_index[pos_inds]
        if gt_boxes.shape[0] == 0:
            pos_gt_boxes = gt_boxes.new_zeros((0, 4))
        else:
            pos_gt_boxes = gt_boxes[assigned]
        return SamplingResult(
            pos_inds=pos_inds,
            neg_inds=neg_inds,
            pos_boxes=boxes[pos_inds],
            neg_boxes=boxes[neg_inds],
            pos_gt_boxes=pos_gt_boxes,
            pos_labels=assign_result.labels[pos_inds],
            pos_assigned_gt_inds=assigned,
            pos_is_gt=gt_flags[pos_inds],
            num_gts=int(gt_boxes.shape[0]),
        )
