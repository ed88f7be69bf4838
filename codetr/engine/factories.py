"""Default builders used when a caller passes no factory: the detector and the data loaders.

The one home of both defaults, shared by :class:`~codetr.engine.trainer.Trainer` (model and loaders) and
:func:`~codetr.engine.predict.predict_images` (model). Callers look them up on this module at call time,
so a test can replace them here (``monkeypatch.setattr(factories, "default_model_factory", ...)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["default_model_factory", "default_loader_factory"]


def default_model_factory(model_cfg: Any) -> nn.Module:
    """``model_cfg -> Detector`` through :func:`codetr.assembly.build_detector`."""
    from codetr.assembly import build_detector

    return build_detector(model_cfg)


def default_loader_factory(source: Any, split: str, *, train: bool, seed: int, device: torch.device) -> Any:
    """``(source_cfg, split, *, train, seed, device) -> loader`` through :func:`codetr.data.loader.build_loader`
    (pinned memory on CUDA)."""
    from codetr.data.loader import build_loader

    return build_loader(source, split, train=train, seed=seed, pin_memory=device.type == "cuda")
