"""RoIAlign with a fast CPU path (same numbers as ``torchvision.ops.roi_align``).

``torchvision.ops.roi_align``'s CPU backward scatters one sample at a time on a single thread; in the CPU
quickstart it was the largest single cost of the Faster R-CNN auxiliary head. On CPU this module expresses
RoIAlign as one ``F.embedding_bag`` per group of RoIs: every output bin is a bag of
``grid_h * grid_w * 4`` feature rows (the four bilinear corners of each sample point) weighted by
``bilinear weight / (grid_h * grid_w)``; the feature gradient is ``embedding_bag``'s own (vectorised)
table gradient. Semantics are torchvision's / MMCV's exactly:

* box corners are scaled by ``spatial_scale`` and shifted by -0.5 when ``aligned`` (else the RoI size is
  clamped to at least 1 feature pixel);
* each of the ``S x S`` bins averages a ``grid_h x grid_w`` grid of sample points at the sub-bin centres,
  with ``grid = sampling_ratio`` or, when it is 0, ``ceil(roi_size / S)`` per RoI (RoIs are grouped by their
  grid so each group is one call);
* a sample outside ``[-1, H] x [-1, W]`` contributes 0; inside, coordinates are clamped to the map
  (torchvision's ``bilinear_interpolate``).

Agreement with torchvision is ~1e-14 in float64 (forward and feature gradient; ``tests/ops/test_roi_align.py``).
On CUDA, and whenever the RoIs need a gradient, torchvision's kernel is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align

__all__ = ["roi_align"]


def roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 0,
              aligned: bool = True) -> Tensor:
    """RoIAlign of ``rois`` on one feature map.

    Args:
        features: (B, C, H, W) feature map.
        rois: (K, 5) ``[batch_index, x1, y1, x2, y2]`` in input pixels (xyxy, absolute).
        output_size: S, the pooled size (S x S bins).
        spatial_scale: feature pixels per input pixel (``1 / stride``).
        sampling_ratio: sample points per bin side; 0 = adaptive ``ceil(roi_size / S)``.
        aligned: pixel-centre alignment (shift by -0.5), as MMDetection's ``aligned=True``.

    Returns:
        (K, C, S, S) pooled features.
    """
    if features.device.type != "cpu" or rois.requires_grad or rois.shape[0] == 0:
        return tv_roi_align(features, rois.to(features.dtype), (output_size, output_size), spatial_scale,
                            sampling_ratio, aligned)
    S = int(output_size)
    r = rois.to(features.dtype)
    off = 0.5 if aligned else 0.0
    x1, y1 = r[:, 1] * spatial_scale - off, r[:, 2] * spatial_scale - off
    x2, y2 = r[:, 3] * spatial_scale - off, r[:, 4] * spatial_scale - off
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    K, C = r.shape[0], features.shape[1]
    if sampling_ratio > 0:
        return _pool_group(features, r[:, 0], x1, y1, rw, rh, S, sampling_ratio, sampling_ratio)
    gh = torch.ceil(rh / S).long()
    gw = torch.ceil(rw / S).long()
    out = features.new_zeros(K, C, S, S)
    pairs = torch.stack([gh, gw], 1)
    for pair in torch.unique(pairs, dim=0).tolist():
        ph, pw = pair
        if ph <= 0 or pw <= 0:
            continue  # an empty sampling grid pools to 0 (torchvision divides by max(count, 1))
        sel = ((gh == ph) & (gw == pw)).nonzero(as_tuple=False).squeeze(1)
        out = out.index_copy(0, sel, _pool_group(features, r[sel, 0], x1[sel], y1[sel], rw[sel], rh[sel], S, ph, pw))
    if features.requires_grad and out.grad_fn is None:
        out = out + features.sum() * 0.0  # keep the map in the graph (DDP: every input used)
    return out


def _axis(v: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sample coordinates along one axis of size n -> (low, high, w_low, w_high, inside) as torchvision."""
    inside = (v >= -1.0) & (v <= n)
    v = v.clamp(min=0)
    lo = v.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    v = torch.where(lo >= n - 1, lo.to(v.dtype), v)
    frac = v - lo.to(v.dtype)
    return lo, hi, 1 - frac, frac, inside


def _pool_group(features: Tensor, batch_idx: Tensor, x1: Tensor, y1: Tensor, rw: Tensor, rh: Tensor, S: int,
                grid_h: int, grid_w: int) -> Tensor:
    """RoIs sharing one sampling grid (grid_h x grid_w per bin) -> (K, C, S, S) via one ``embedding_bag``."""
    B, C, H, W = features.shape
    K = x1.shape[0]
    dt = features.dtype
    gy = (torch.arange(S * grid_h, dtype=dt) + 0.5) / grid_h      # sample positions in bin units
    gx = (torch.arange(S * grid_w, dtype=dt) + 0.5) / grid_w
    ys = y1[:, None] + gy[None] * (rh / S)[:, None]                 # (K, S*grid_h)
    xs = x1[:, None] + gx[None] * (rw / S)[:, None]                 # (K, S*grid_w)
    yl, yh, wyl, wyh, iny = _axis(ys, H)
    xl, xh, wxl, wxh, inx = _axis(xs, W)
    base = (batch_idx.long() * (H * W))[:, None, None]
    row_l, row_h = base + (yl * W)[:, :, None], base + (yh * W)[:, :, None]
    idx = torch.stack([row_l + xl[:, None, :], row_l + xh[:, None, :], row_h + xl[:, None, :],
                       row_h + xh[:, None, :]], -1)                 # (K, S*gh, S*gw, 4)
    keep = (iny[:, :, None] & inx[:, None, :]).to(dt) / (grid_h * grid_w)
    w = torch.stack([wyl[:, :, None] * wxl[:, None, :], wyl[:, :, None] * wxh[:, None, :],
                     wyh[:, :, None] * wxl[:, None, :], wyh[:, :, None] * wxh[:, None, :]], -1) * keep[..., None]
    bag = grid_h * grid_w * 4
    idx = idx.view(K, S, grid_h, S, grid_w, 4).permute(0, 1, 3, 2, 4, 5).reshape(K * S * S, bag)
    w = w.view(K, S, grid_h, S, grid_w, 4).permute(0, 1, 3, 2, 4, 5).reshape(K * S * S, bag)
    table = features.permute(0, 2, 3, 1).reshape(B * H * W, C)
    out = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
    return out.view(K, S, S, C).permute(0, 3, 1, 2).contiguous()
