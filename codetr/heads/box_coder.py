"""Box <-> delta coder shared by the anchor-based heads (ATSS, RPN, RoI).

:class:`DeltaXYWHCoder` reproduces MMDetection's ``DeltaXYWHBBoxCoder`` (``bbox2delta`` /
``delta2bbox``; paraphrased, not copied), including the operation order that matters for float32
parity::

    encode:  dx = (gx - px) / pw, dy = (gy - py) / ph, dw = log(gw / pw), dh = log(gh / ph);
             deltas = (d - means) / stds
    decode:  d = deltas * stds + means
             dxy_wh = pwh * dxy                    (optionally clamped to +-ctr_clamp px)
             dwh clamped to +-|log(wh_ratio_clip)| (only the upper bound with add_ctr_clamp)
             gxy = pxy + dxy_wh, gwh = pwh * exp(dwh)
             boxes = [gxy - gwh / 2, gxy + gwh / 2], clipped to max_shape = (h, w) if clip_border

All boxes are xyxy in the same (absolute pixel) frame. Decode supports class-specific deltas
``(..., 4 * K)`` (each group of 4 decoded against the same anchor) and any leading batch dims.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["DeltaXYWHCoder"]


class DeltaXYWHCoder:
    """MMDetection ``DeltaXYWHBBoxCoder``.

    Args:
        means, stds: delta normalisation (``target_means`` / ``target_stds``).
        clip_border: clip decoded boxes to ``max_shape`` when one is given.
        add_ctr_clamp: clamp the centre shift to ``+-ctr_clamp`` pixels (and only the upper bound of dw/dh).
        ctr_clamp: see ``add_ctr_clamp``.
        wh_ratio_clip: dw/dh are clamped to ``+-|log(wh_ratio_clip)|`` (default 16/1000).
    """

    def __init__(self, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clip_border: bool = True, add_ctr_clamp: bool = False, ctr_clamp: float = 32.0,
                 wh_ratio_clip: float = 16 / 1000):
        if len(means) != 4 or len(stds) != 4:
            raise ValueError("means and stds must have 4 entries")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.clip_border = clip_border
        self.add_ctr_clamp = add_ctr_clamp
        self.ctr_clamp = float(ctr_clamp)
        self.wh_ratio_clip = float(wh_ratio_clip)

    def encode(self, proposals: Tensor, gt: Tensor) -> Tensor:
        """(..., 4) proposals and aligned (..., 4) GT boxes (xyxy) -> (..., 4) normalised deltas."""
        if proposals.shape != gt.shape:
            raise ValueError(f"proposals {tuple(proposals.shape)} and gt {tuple(gt.shape)} must match")
        proposals = proposals.float()
        gt = gt.float()
        px = (proposals[..., 0] + proposals[..., 2]) * 0.5
        py = (proposals[..., 1] + proposals[..., 3]) * 0.5
        pw = proposals[..., 2] - proposals[..., 0]
        ph = proposals[..., 3] - proposals[..., 1]
        gx = (gt[..., 0] + gt[..., 2]) * 0.5
        gy = (gt[..., 1] + gt[..., 3]) * 0.5
        gw = gt[..., 2] - gt[..., 0]
        gh = gt[..., 3] - gt[..., 1]
        dx = (gx - px) / pw
        dy = (gy - py) / ph
        dw = torch.log(gw / pw)
        dh = torch.log(gh / ph)
        deltas = torch.stack([dx, dy, dw, dh], dim=-1)
        means = deltas.new_tensor(self.means)
        stds = deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(self, anchors: Tensor, deltas: Tensor, max_shape: Sequence[int] | Tensor | None = None) -> Tensor:
        """Apply deltas to anchors.

        Args:
            anchors: (..., 4) xyxy boxes (broadcastable to the leading dims of ``deltas``).
            deltas: (..., 4 * K) normalised deltas.
            max_shape: optional (h, w) to clip the decoded boxes to ``[0, w] x [0, h]``.

        Returns:
            (..., 4 * K) decoded xyxy boxes.
        """
        if deltas.shape[-1] % 4 != 0:
            raise ValueError(f"deltas last dim must be a multiple of 4, got {deltas.shape[-1]}")
        if deltas.numel() == 0:
            return deltas.clone()
        k = deltas.shape[-1] // 4
        lead = deltas.shape[:-1]
        d = deltas.reshape(*lead, k, 4)
        a = anchors.reshape(*anchors.shape[:-1], 1, 4).to(d.dtype)
        means = d.new_tensor(self.means)
        stds = d.new_tensor(self.stds)
        denorm = d * stds + means
        dxy = denorm[..., :2]
        dwh = denorm[..., 2:]
        pxy = (a[..., :2] + a[..., 2:]) * 0.5
        pwh = a[..., 2:] - a[..., :2]
        dxy_wh = pwh * dxy
        max_ratio = abs(math.log(self.wh_ratio_clip))
        if self.add_ctr_clamp:
            dxy_wh = dxy_wh.clamp(min=-self.ctr_clamp, max=self.ctr_clamp)
            dwh = dwh.clamp(max=max_ratio)
        else:
            dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
        gxy = pxy + dxy_wh
        gwh = pwh * dwh.exp()
        x1y1 = gxy - gwh * 0.5
        x2y2 = gxy + gwh * 0.5
        boxes = torch.cat([x1y1, x2y2], dim=-1)
        if self.clip_border and max_shape is not None:
            h, w = (max_shape.tolist() if isinstance(max_shape, Tensor) else max_shape)[:2]
            x = boxes[..., 0::2].clamp(min=0, max=float(w))
            y = boxes[..., 1::2].clamp(min=0, max=float(h))
            boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
        return boxes.reshape(*lead, 4 * k)
