"""Exponential moving average (EMA) of the model weights (``model.ema: {decay, warmup}``).

After every applied optimizer step ``ema = d_t * ema + (1 - d_t) * online`` for every floating-point
parameter and buffer (integer buffers, e.g. BN step counters, are copied), with

    d_t = decay * (1 - exp(-t / warmup))      (t = number of updates so far; d_t = decay when warmup = 0)

so early updates follow the online weights closely (the ramp used by YOLOv5/Ultralytics and DINO's EMA
runs). ``torch.optim.swa_utils.AveragedModel`` + ``get_ema_multi_avg_fn`` implement a fixed decay only;
the ramp and the plain state dict we checkpoint are the reasons for this small class. The EMA copy never
trains (``requires_grad=False``, eval mode) and draws no random numbers, so a run with EMA follows the
same optimisation trajectory as one without. The trainer evaluates and exports the EMA weights.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """EMA of ``model``'s ``state_dict`` (same keys); see the module docstring.

    Args:
        model: the online model (not the DDP wrapper); deep-copied once.
        decay: the asymptotic decay in (0, 1).
        warmup: updates over which the decay ramps up (0: no ramp).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.ema.decay must be in (0, 1), got {decay}")
        self.decay, self.warmup = float(decay), int(warmup)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def decay_at(self, t: int) -> float:
        return self.decay * (1.0 - math.exp(-t / self.warmup)) if self.warmup > 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        self.updates += 1
        d = self.decay_at(self.updates)
        online = model.state_dict()
        for key, avg in self.module.state_dict().items():
            cur = online[key].detach()
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(cur.to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(cur)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
