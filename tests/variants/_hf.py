"""Helpers shared by the HuggingFace ``transformers`` parity tests (``test_hf_*parity.py``).

* :func:`randomize` -- every float parameter / buffer of an HF model random (HF's init zeroes several tensors,
  which would hide mapping errors), tied parameters kept tied.
* :func:`padded_batch` -- two images of different valid sizes in one zero-padded batch (image 1 padded on the
  bottom and the right), optionally with targets.
* :func:`close` -- shape / finiteness / max-abs-diff check that records the measured difference.
* :data:`TARGETS` / :func:`hf_labels` -- ground truth for the padded batch, and the same targets in HF's loss
  format (for the loss-parity tests).
"""

from __future__ import annotations

import re
from itertools import chain

import torch
from torch import Tensor, nn

from codetr.core.structures import Batch, Target, normalize_boxes

__all__ = ["ATOL", "HW", "VALID", "TARGETS", "randomize", "padded_batch", "close", "hf_labels"]

ATOL = 1e-4
HW = (160, 192)
VALID = [(160, 192), (96, 120)]  # image 1 is padded on the bottom and the right
#: ground truth of the two images of :func:`padded_batch` (xyxy pixels inside each valid area, labels < 7)
TARGETS = [
    Target(boxes=torch.tensor([[10.0, 20.0, 90.0, 120.0], [100.0, 30.0, 180.0, 90.0], [40.0, 60.0, 70.0, 150.0]]),
           labels=torch.tensor([0, 6, 3]), iscrowd=torch.zeros(3, dtype=torch.bool)),
    Target(boxes=torch.tensor([[5.0, 8.0, 60.0, 50.0], [30.0, 40.0, 110.0, 90.0]]),
           labels=torch.tensor([2, 2]), iscrowd=torch.zeros(2, dtype=torch.bool)),
]


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    """Every float parameter / buffer random (tied parameters stay tied: named_parameters de-duplicates)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=g)

    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
        elif name.endswith("running_mean"):
            t.copy_(0.1 * rnd(t))
        elif name.endswith("level_embed") or name.endswith("query_position_embeddings.weight"):
            t.copy_(rnd(t))
        elif t.dim() >= 2:
            t.copy_(rnd(t) / t[0].numel() ** 0.5)
        elif re.search(r"(norm|normalization|input_proj\.\d+\.1)\.weight$", name):
            t.copy_(1 + 0.1 * rnd(t))
        else:  # biases (the offset bias keeps its direction grid, plus noise)
            t.add_(0.1 * rnd(t))


def padded_batch(targets: list[Target] | None = None, hw: tuple[int, int] = HW,
                 valid: list[tuple[int, int]] = VALID, seed: int = 1) -> Batch:
    """A zero-padded batch of ``len(valid)`` random images (valid sizes ``valid``, canvas ``hw``)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(len(valid), 3, *hw)
    masks = torch.ones(len(valid), *hw, dtype=torch.bool)
    for i, (h, w) in enumerate(valid):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        masks[i, :h, :w] = False
    return Batch(images=images, masks=masks, targets=list(targets or []), image_sizes=torch.tensor(valid),
                 orig_sizes=torch.tensor(valid), image_ids=list(range(len(valid))))


def close(name: str, got: Tensor, want: Tensor, diffs: dict[str, float], atol: float = ATOL) -> None:
    """Assert ``got`` equals ``want`` within ``atol`` (same shape, same non-finite entries); record the diff."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite entries differ"
    assert torch.equal(got[~finite], want[~finite]), f"{name}: non-finite values differ"
    diff = (got[finite].double() - want[finite].double()).abs().max().item() if finite.any() else 0.0
    diffs[name] = diff
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol:g}"


def hf_labels(batch: Batch) -> list[dict[str, Tensor]]:
    """HF's targets: ``class_labels`` and normalised cxcywh ``boxes`` relative to each image's valid size."""
    return [{"class_labels": t.labels.clone(), "boxes": normalize_boxes(t.boxes, batch.image_sizes[i])}
            for i, t in enumerate(batch.targets)]
