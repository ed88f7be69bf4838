"""RoI parts of the Faster R-CNN auxiliary head (MMDetection ``SingleRoIExtractor`` + ``Shared2FCBBoxHead``).

* :class:`RoIExtractor`: every RoI is pooled from one pyramid level chosen by its scale,
  ``level = clamp(floor(log2(sqrt(w * h) / finest_scale + 1e-6)), 0, L - 1)``, with
  :func:`codetr.ops.roi_align.roi_align` (``aligned=True``, ``sampling_ratio`` 0 = adaptive, spatial scale
  ``1 / stride``): torchvision's RoIAlign (bit-identical to MMCV's) with a faster CPU path. An unused
  level still enters the graph as ``feats.sum() * 0`` (as the official extractor), so distributed training
  sees every input used.
* :class:`Shared2FCBBoxHead`: flatten -> ``shared_fcs`` (Linear + ReLU, twice) -> ``fc_cls``
  (``num_classes + 1`` softmax logits, background last) and ``fc_reg`` (``4 * num_classes``
  class-specific deltas, or 4 when class-agnostic). Parameter names equal the official
  ``roi_head.0.bbox_head.*`` keys (minus the ``roi_head.0.`` prefix).

RoIs are (K, 5) ``[batch_index, x1, y1, x2, y2]`` in input pixels (MMDetection ``bbox2roi``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.ops.roi_align import roi_align

__all__ = ["boxes_to_rois", "map_roi_levels", "RoIExtractor", "Shared2FCBBoxHead"]


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """B tensors (N_b, 4+) -> (sum N_b, 5) ``[b, x1, y1, x2, y2]`` (MMDetection ``bbox2roi``)."""
    rois = []
    for b, bx in enumerate(boxes):
        idx = bx.new_full((bx.shape[0], 1), b)
        rois.append(torch.cat([idx, bx[:, :4]], dim=-1))
    return torch.cat(rois, 0)


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: float) -> Tensor:
    """(K, 5) RoIs -> (K,) int64 level index (MMDetection ``SingleRoIExtractor.map_roi_levels``)."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    lvls = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return lvls.clamp(min=0, max=num_levels - 1).long()


class RoIExtractor(nn.Module):
    """Single-level RoIAlign per RoI (no parameters)."""

    def __init__(self, strides: list[int], output_size: int = 7, sampling_ratio: int = 0,
                 aligned: bool = True, finest_scale: float = 56.0):
        super().__init__()
        self.strides = [int(s) for s in strides]
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = aligned
        self.finest_scale = float(finest_scale)

    def forward(self, feats: list[Tensor], rois: Tensor) -> Tensor:
        """``feats``: the L maps (B, C, H_l, W_l) of ``strides``; ``rois`` (K, 5) -> (K, C, S, S)."""
        if len(feats) != len(self.strides):
            raise ValueError(f"RoIExtractor got {len(feats)} maps for strides {self.strides}")
        s = self.output_size
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], s, s)
        if rois.shape[0] == 0:
            return out + sum(f.sum() * 0.0 for f in feats)
        if len(feats) == 1:
            return roi_align(feats[0], rois, s, 1.0 / self.strides[0], self.sampling_ratio, self.aligned)
        lvls = map_roi_levels(rois, len(feats), self.finest_scale)
        for i, f in enumerate(feats):
            inds = (lvls == i).nonzero(as_tuple=False).squeeze(1)
            if inds.numel() > 0:
                out[inds] = roi_align(f, rois[inds], s, 1.0 / self.strides[i], self.sampling_ratio, self.aligned)
            else:
                out = out + f.sum() * 0.0
        return out


class Shared2FCBBoxHead(nn.Module):
    """Two shared FC layers + class / box predictors (MMDetection ``Shared2FCBBoxHead``).

    Init as MMDetection: Xavier-uniform shared FCs, ``fc_cls`` Normal(0, 0.01), ``fc_reg``
    Normal(0, 0.001), zero biases.
    """

    def __init__(self, in_channels: int, num_classes: int, roi_feat_size: int = 7, fc_out_channels: int = 1024,
                 num_shared_fcs: int = 2, reg_class_agnostic: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.reg_class_agnostic = reg_class_agnostic
        dims = [in_channels * roi_feat_size * roi_feat_size] + [fc_out_channels] * num_shared_fcs
        self.shared_fcs = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(num_shared_fcs))
        self.fc_cls = nn.Linear(dims[-1], num_classes + 1)
        self.fc_reg = nn.Linear(dims[-1], 4 if reg_class_agnostic else 4 * num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        """(K, C, S, S) -> (cls logits (K, num_classes + 1), deltas (K, 4 * num_classes or 4))."""
        x = roi_feats.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)

