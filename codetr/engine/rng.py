"""Seeding and isolation of the global RNG streams (Python ``random``, NumPy, torch CPU / CUDA).

The trainer seeds once for the model build and once per rank for training; data loading and evaluation
run under :func:`isolated_rng` so they never advance the streams the model sees (exact resume relies on it).
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

__all__ = ["isolated_rng", "seed_all"]


@contextlib.contextmanager
def isolated_rng(device: torch.device | None = None) -> Iterator[None]:
    """Run a block without affecting the Python / NumPy / torch (CPU, current CUDA device) RNG streams."""
    py, npst, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npst)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def seed_all(seed: int) -> None:
    """Seed Python ``random``, NumPy (``seed mod 2**32``) and torch (every device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
