"""Errors raised by the training engine itself (checkpoint and distributed errors live with their modules)."""

from __future__ import annotations

__all__ = ["TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot continue (divergence, bad model output); the message holds the diagnosis."""
