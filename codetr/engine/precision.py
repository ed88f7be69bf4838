"""Numeric precision and determinism settings of a run (``runtime.precision`` / ``runtime.deterministic``).

``fp32`` runs without autocast; ``bf16`` / ``fp16`` run the forward passes (training and evaluation) under
``torch.autocast`` (``fp16`` additionally uses a ``GradScaler``, built by the trainer). Determinism switches
PyTorch to deterministic algorithms with ``warn_only=True``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager

import torch

__all__ = ["AMP_DTYPES", "amp_dtype", "autocast", "configure_determinism"]

#: ``runtime.precision`` -> autocast dtype (``None``: no autocast).
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision``; raises ``ValueError`` for bf16 on a GPU without bfloat16."""
    dtype = AMP_DTYPES[precision]
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("runtime.precision=bf16 but this GPU has no bfloat16 support "
                         "(fix: runtime.precision=fp16 or fp32)")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[Any]:
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op context for fp32 (``dtype`` ``None``)."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def configure_determinism(device: torch.device, say: Callable[[str], None]) -> None:
    """Deterministic algorithms (``warn_only``); on CUDA also cuBLAS workspace / cuDNN settings and a note
    (through ``say``) that MSDA backward stays non-deterministic there."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        say("[yellow]note:[/] runtime.deterministic on CUDA: the backward of grid_sample "
            "(multi-scale deformable attention) has no deterministic kernel, so MSDA models are "
            "still not bit-reproducible on GPU (warn_only=True)")
