"""Small tensor functions shared by variants and heads (one home each)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["inverse_sigmoid"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms clamped to ``eps`` (official semantics)."""
    x = x.clamp(min=0, max=1)
    return (x.clamp(min=eps) / (1 - x).clamp(min=eps)).log()
