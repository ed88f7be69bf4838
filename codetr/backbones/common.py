"""Validation shared by the backbone configs (stage indices 1..4 = strides 4, 8, 16, 32)."""

from __future__ import annotations

from torch import nn


def check_out_indices(v: tuple[int, ...], stage_names: str, mmdet_hint: str) -> tuple[int, ...]:
    """1-based, strictly increasing stage indices; ``stage_names`` / ``mmdet_hint`` make the message specific."""
    if not v:
        raise ValueError(f"out_indices must name at least one stage (1..4 = {stage_names})")
    if any(i not in (1, 2, 3, 4) for i in v):
        raise ValueError(f"out_indices {list(v)}: stage indices are 1..4 ({stage_names}); {mmdet_hint}")
    if list(v) != sorted(set(v)):
        raise ValueError(f"out_indices {list(v)} must be strictly increasing")
    return v


def check_frozen_stages(v: int, first: str) -> int:
    """-1 (nothing), 0 (``first``: stem / patch embedding) or 1..4 (+ stages 1..k)."""
    if not -1 <= v <= 4:
        raise ValueError(f"frozen_stages={v}: use -1 (none), 0 ({first}) or 1..4 (+ stages 1..k)")
    return v


class FrozenStagesMixin:
    """Frozen stages for backbones: subclasses list them in ``_frozen_modules()``; they get
    ``requires_grad=False`` (``_freeze_stages``) and stay in eval mode when the model is put in train mode."""

    def _frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                m.eval()
        return self
