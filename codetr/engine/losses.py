"""The loss-dict contract between a detector and the engine, and the training forward pass.

``Detector.loss(batch)`` returns a dict of tensors: entries whose name contains :data:`LOSS_KEY`
(``"loss"``) are scalar, already weighted loss terms and are summed into the training loss; every other
entry (e.g. ``num_pos``) is only logged. The forward goes through :class:`LossModule` so that DDP's
forward hooks (gradient synchronisation) see it.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from codetr.core.structures import Batch
from codetr.engine import distributed as du
from codetr.engine.errors import TrainingError
from codetr.engine.precision import autocast

__all__ = ["LOSS_KEY", "LossModule", "sum_losses", "forward_losses"]

#: A loss-dict entry is summed into the training loss iff its name contains this; other entries are logged only.
LOSS_KEY = "loss"


class LossModule(nn.Module):
    """Routes ``forward`` to ``detector.loss`` so DDP's forward hooks (gradient sync) are used."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.detector.loss(batch)


def sum_losses(losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(total, loss terms, other entries)``; terms are the entries whose name contains ``"loss"``."""
    if not isinstance(losses, Mapping):
        raise TrainingError(f"Detector.loss must return a dict of tensors, got {type(losses).__name__}")
    terms: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for k, v in losses.items():
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v, dtype=torch.float32)
        if LOSS_KEY in k:
            if v.numel() != 1:
                raise TrainingError(f"loss term {k!r} has shape {tuple(v.shape)}; every loss term must be a scalar")
            terms[k] = v.reshape(())
        else:
            extra[k] = v
    if not terms:
        raise TrainingError(f"Detector.loss returned no loss term (no key contains {LOSS_KEY!r}): {sorted(losses)}")
    total = torch.stack([t.float() for t in terms.values()]).sum()
    return total, terms, extra


def forward_losses(ddp_model: nn.Module, model: nn.Module, batch: Batch, device: torch.device,
                   dtype: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`sum_losses` of ``ddp_model(batch)`` (the DDP-wrapped :class:`LossModule` of ``model``) under
    autocast; a DDP unused-parameter error is re-raised with the offending parameter names of ``model``."""
    try:
        with autocast(device, dtype):
            losses = ddp_model(batch)
    except RuntimeError as exc:
        better = du.explain_ddp_error(exc, model)  # same parameter order as the DDP wrapper
        if better is not None:
            raise better from exc
        raise
    return sum_losses(losses)
