"""ATSS auxiliary head (Co-DETR's ``CoATSSHead``) for the collaborative one-to-many branch.

Re-implementation (paraphrased, not copied) of MMDetection's ``ATSSHead`` as used by the official
Co-DETR ``CoATSSHead`` (Co-Deformable-DETR: MMDetection 2.25; Co-DINO: the MMDetection 3.x port):

* **Towers**: ``stacked_convs`` x (Conv3x3 (no bias) + GroupNorm + ReLU) for classification and for
  regression; ``atss_cls`` / ``atss_reg`` / ``atss_centerness`` are Conv3x3 with bias; the
  regression output is multiplied by a learnable per-level scalar ``scales[l].scale`` (init 1).
  Init: every conv weight ~ N(0, 0.01), bias 0; ``atss_cls`` bias = -log((1 - p) / p), p = 0.01.
* **Anchors**: one square anchor of side ``anchor_scale * stride`` per location, centred on
  ``(x * stride, y * stride)`` (``center_offset`` 0); valid where the location lies inside the
  image's valid size (MMDetection ceil rule, ``allowed_border=-1``).
* **Assignment**: the configured one-to-many assigner (ATSS, top-9) on the valid anchors of each
  image against its non-crowd GT.
* **Losses** (level by level over the whole batch, as official):
  ``loss_cls`` = sigmoid focal (alpha 0.25, gamma 2) over all valid anchors / N_pos;
  ``loss_bbox`` = GIoU between the decoded positive boxes (DeltaXYWH, stds 0.1/0.1/0.2/0.2, no
  clipping) and their GT, weighted by the centerness targets / (sum of centerness targets);
  ``loss_centerness`` = BCE(centerness logit, centerness target) over positives / N_pos.
  ``N_pos = max(mean over ranks of sum_b max(npos_b, 1), 1)`` (every image counts at least 1) and
  the centerness-target sum is the rank mean clamped to >= 1. A level without positives gives
  ``0 * sum(pred)`` so all parameters stay in the graph. The per-level terms are summed into one
  scalar per loss name.
* **Weights**: the config holds the BASE weights (1.0 / 2.0 / 1.0). The Co-DETR branch builds the
  head with ``loss_scale = lambda_2 * num_decoder_layers`` (official 2.0 x 6 = 12) and every loss is
  multiplied by it, so the recipe never repeats that factor.
* **PositiveCoords** (official ``pos_coords``): for each image ALL anchors in level-major order
  (invalid ones zeroed), the assigned labels (background = ``num_classes``, also for invalid
  anchors), the assigned GT boxes (zeros for negatives), and ``feats`` = the pyramid feature of each
  anchor's cell, (N_anchors, C), all levels including the adapter's extra level.
* **predict** (official ATSS ``test_cfg``): per level sigmoid scores, keep ``score > score_thr``,
  top ``nms_pre`` (score, class) pairs, decode with clipping to the valid image, multiply by the
  sigmoid centerness, drop boxes with ``w, h <= min_bbox_size`` (MMDetection 3.x; ``None`` skips it,
  like 2.x), class-wise NMS (IoU 0.6), keep ``max_per_img``. Boxes in the network-input frame.

* **Levels**: one ``Scale`` per pyramid level, so the level count is fixed at construction: ``strides``
  if given, else ``pyramid_levels``, else the injected ``num_levels`` (encoder levels) + 1 (the
  multi-scale adapter's extra level), else 5. Co-Deformable-DETR: 4 + 1; Co-DINO: 5 + 1 (strides 4..128).

Official key names map 1:1 after stripping the ``bbox_head.<i>.`` prefix
(:func:`official_atss_key_map`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torchvision.ops import batched_nms

from codetr.assigners import build_one_to_many
from codetr.assigners.atss import ATSSAssigner, ATSSAssignerConfig
from codetr.core.interfaces import (AssignResult, AuxHead, AuxHeadOutput, FeaturePyramid, OneToManyAssigner,
                                    PositiveCoords)
from codetr.core.registry import Component, ComponentConfig, component_field
from codetr.core.dist import reduce_mean
from codetr.core.structures import Batch, Detections
from codetr.heads.anchors import AnchorGenerator
from codetr.heads.box_coder import DeltaXYWHCoder
from codetr.heads.losses import giou_loss_mmdet, sigmoid_focal_loss_mmdet

__all__ = [
    "ATSSHeadConfig",
    "ATSSHead",
    "ATSSTargets",
    "Scale",
    "ConvGNReLU",
    "official_atss_key_map",
    "official_atss_state_dict",
    "build_atss_head",
    "COMPONENT",
]

_FLOAT_EPS = float(torch.finfo(torch.float32).eps)


# --------------------------------------------------------------------------- config
class ATSSHeadConfig(ComponentConfig):
    """ATSS auxiliary head. ``num_classes`` / ``hidden_dim`` (input channels) are injected by the recipe.

    Loss weights are the BASE weights; the Co-DETR branch multiplies them by
    ``lambda_2 * num_decoder_layers`` through the builder's ``loss_scale`` argument.
    """

    type: Literal["atss"] = "atss"
    num_classes: int | None = None
    hidden_dim: int | None = None
    num_levels: int | None = Field(
        None, description="encoder levels (injected by the recipe); the pyramid has num_levels + 1 (adapter level)")
    feat_channels: int = Field(256, ge=1)
    stacked_convs: int = Field(1, ge=0)
    norm_groups: int = Field(32, ge=1)
    anchor_scale: float = Field(8.0, gt=0, description="octave base scale: one square anchor of side scale x stride")
    strides: list[int] | None = Field(None, description="None: the pyramid's strides at run time")
    pyramid_levels: int | None = Field(
        None, ge=1,
        description="pyramid levels (= per-level Scales); default len(strides), else num_levels + 1, else 5")
    center_offset: float = Field(0.0, ge=0, le=1)
    bbox_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    assigner: component_field("assigners") = Field(default_factory=lambda: ATSSAssignerConfig(topk=9))
    loss_cls_weight: float = Field(1.0, ge=0)
    loss_bbox_weight: float = Field(2.0, ge=0)
    loss_centerness_weight: float = Field(1.0, ge=0)
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    prior_prob: float = Field(0.01, gt=0, lt=1)
    # test (eval_module: one-stage)
    nms_pre: int = Field(1000, ge=1)
    score_thr: float = Field(0.0, ge=0)
    nms_iou: float = Field(0.6, gt=0, le=1)
    max_per_img: int = Field(100, ge=1)
    min_bbox_size: float | None = Field(0.0, description="MMDetection 3.x filter (w, h > value); None: 2.x, off")


# --------------------------------------------------------------------------- modules
class Scale(nn.Module):
    """Learnable scalar multiplier (mmcv ``Scale``; parameter ``scale`` of shape ())."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ConvGNReLU(nn.Module):
    """Conv3x3 (no bias) + GroupNorm + ReLU; attribute names ``conv`` / ``gn`` as mmcv ``ConvModule``."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(norm_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


@dataclass
class ATSSTargets:
    """Anchors and assignment of a batch (all tensors on the pyramid's device).

    Attributes:
        anchors: (A, 4) anchors of all levels (shared by the images), level-major.
        num_per_level: A_l per level.
        valid: (B, A) bool valid flags.
        labels: (B, A) int64 assigned class, background = num_classes (also for invalid anchors).
        label_weights: (B, A) float, 1 on valid anchors.
        bbox_targets: (B, A, 4) assigned GT xyxy, zeros elsewhere.
        gt_index: (B, A) int64 0-based GT index (into the non-crowd targets), -1 elsewhere.
        max_iou: (B, A) float, IoU with the assigned / best GT (0 on invalid anchors).
        num_pos: B python ints.
    """

    anchors: Tensor
    num_per_level: list[int]
    valid: Tensor
    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    gt_index: Tensor
    max_iou: Tensor
    num_pos: list[int]


def centerness_target(anchors: Tensor, gts: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of the anchor centres inside their GT boxes.

    Distances are clamped at 0, so a positive whose centre lies outside its GT box (ATSS never makes one;
    centre-radius assigners such as SimOTA can) gets target 0 instead of NaN; inside values are unchanged.
    """
    cx = (anchors[:, 2] + anchors[:, 0]) / 2
    cy = (anchors[:, 3] + anchors[:, 1]) / 2
    l_ = (cx - gts[:, 0]).clamp(min=0)
    t_ = (cy - gts[:, 1]).clamp(min=0)
    r_ = (gts[:, 2] - cx).clamp(min=0)
    b_ = (gts[:, 3] - cy).clamp(min=0)
    lr = torch.stack([l_, r_], dim=1)
    tb = torch.stack([t_, b_], dim=1)
    return torch.sqrt((lr.min(dim=-1)[0] / lr.max(dim=-1)[0]) * (tb.min(dim=-1)[0] / tb.max(dim=-1)[0]))


class ATSSHead(AuxHead):
    """ATSS auxiliary head; see the module docstring. Build from a recipe with :func:`build_atss_head`.

    Args:
        cfg: the head config; ``num_classes`` and ``hidden_dim`` (the pyramid's channels) must be set.
        assigner: the built one-to-many assigner of ``cfg.assigner`` (None: ATSS top-``cfg.assigner.topk``
            when ``cfg.assigner`` is an ATSS config). Assigners with ``uses_predictions = True`` also
            receive the detached sigmoid scores and decoded boxes.
        loss_scale: multiplier of all three losses (Co-DETR: ``lambda_2 * num_decoder_layers``).
    """

    tag = "atss"

    def __init__(self, cfg: ATSSHeadConfig, assigner: OneToManyAssigner | None = None, loss_scale: float = 1.0):
        super().__init__()
        cfg.require_shared("num_classes", "hidden_dim")
        if assigner is None:
            if not isinstance(cfg.assigner, ATSSAssignerConfig):
                raise ValueError(f"ATSSHead: pass the built assigner for assigner type {cfg.assigner.type!r} "
                                 "(build_atss_head does it through the registry)")
            assigner = ATSSAssigner(cfg.assigner)
        self.cfg = cfg
        self.num_classes = int(cfg.num_classes)
        self.in_channels = int(cfg.hidden_dim)
        self.feat_channels = int(cfg.feat_channels)
        self.strides = None if cfg.strides is None else [int(s) for s in cfg.strides]
        self.num_levels = int(_pyramid_levels(cfg) or 5)  # len(strides), pyramid_levels, num_levels + 1, else 5
        self.anchor_scale = float(cfg.anchor_scale)
        self.center_offset = float(cfg.center_offset)
        self.coder = DeltaXYWHCoder(means=(0.0, 0.0, 0.0, 0.0), stds=tuple(cfg.bbox_stds))
        self.assigner = assigner
        self.loss_cls_weight = float(cfg.loss_cls_weight)
        self.loss_bbox_weight = float(cfg.loss_bbox_weight)
        self.loss_centerness_weight = float(cfg.loss_centerness_weight)
        self.focal_alpha = float(cfg.focal_alpha)
        self.focal_gamma = float(cfg.focal_gamma)
        self.prior_prob = float(cfg.prior_prob)
        self.loss_scale = float(loss_scale)
        self.nms_pre = int(cfg.nms_pre)
        self.score_thr = float(cfg.score_thr)
        self.nms_iou = float(cfg.nms_iou)
        self.max_per_img = int(cfg.max_per_img)
        self.min_bbox_size = cfg.min_bbox_size
        stacked_convs, norm_groups = cfg.stacked_convs, cfg.norm_groups

        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for i in range(stacked_convs):
            chn = self.in_channels if i == 0 else self.feat_channels
            self.cls_convs.append(ConvGNReLU(chn, self.feat_channels, norm_groups))
            self.reg_convs.append(ConvGNReLU(chn, self.feat_channels, norm_groups))
        tower_out = self.feat_channels if stacked_convs > 0 else self.in_channels
        self.atss_cls = nn.Conv2d(tower_out, self.num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(tower_out, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(tower_out, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(self.num_levels)])
        self._anchor_cache: dict[tuple, AnchorGenerator] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: N(0, 0.01) on every conv, zero biases, focal prior on ``atss_cls``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - self.prior_prob) / self.prior_prob))
        for s in self.scales:
            nn.init.constant_(s.scale, 1.0)

    # ------------------------------------------------------------------ helpers
    def _pyramid_strides(self, pyramid: FeaturePyramid) -> list[int]:
        if len(pyramid) != self.num_levels:
            raise ValueError(f"ATSSHead has {self.num_levels} per-level scales but the pyramid has {len(pyramid)} "
                             "levels; set `strides` or `pyramid_levels` in the head config")
        strides = self.strides if self.strides is not None else [int(s) for s in pyramid.strides]
        if len(strides) != len(pyramid):
            raise ValueError(f"{len(strides)} strides for {len(pyramid)} pyramid levels")
        return strides

    def anchor_generator(self, strides: list[int]) -> AnchorGenerator:
        key = tuple(strides)
        gen = self._anchor_cache.get(key)
        if gen is None:
            gen = AnchorGenerator(strides, octave_base_scale=self.anchor_scale, scales_per_octave=1,
                                  ratios=(1.0,), center_offset=self.center_offset)
            self._anchor_cache[key] = gen
        return gen

    # ------------------------------------------------------------------ forward
    def forward(self, pyramid: FeaturePyramid) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: class logits (B, C, H, W), scaled deltas (B, 4, H, W), centerness logits (B, 1, H, W)."""
        self._pyramid_strides(pyramid)
        cls_scores, bbox_preds, centernesses = [], [], []
        for x, scale in zip(pyramid.maps, self.scales):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls_scores.append(self.atss_cls(cls_feat))
            bbox_preds.append(scale(self.atss_reg(reg_feat)).float())
            centernesses.append(self.atss_centerness(reg_feat))
        return cls_scores, bbox_preds, centernesses

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def get_targets(self, pyramid: FeaturePyramid, batch: Batch,
                    outputs: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None) -> ATSSTargets:
        """Anchors, valid flags and per-image assignment (crowd GT removed)."""
        strides = self._pyramid_strides(pyramid)
        gen = self.anchor_generator(strides)
        sizes = pyramid.spatial_shapes
        device = pyramid.maps[0].device
        level_anchors = gen.grid_anchors(sizes, device=device)
        num_per_level = [int(a.shape[0]) for a in level_anchors]
        anchors = torch.cat(level_anchors, dim=0)
        num_anchors = anchors.shape[0]
        uses_preds = self.assigner.uses_predictions
        if uses_preds and outputs is not None:
            all_scores, all_boxes = self._flat_predictions(outputs, anchors)

        valid_l, labels_l, weights_l, boxes_l, gidx_l, iou_l, npos = [], [], [], [], [], [], []
        for b in range(len(batch)):
            valid_per_level = gen.valid_flags(sizes, batch.image_sizes[b], device=device)
            valid = torch.cat(valid_per_level)
            n_valid_level = [int(v.sum()) for v in valid_per_level]
            tgt = batch.targets[b].non_crowd().to(device)
            kwargs = {}
            if uses_preds and outputs is not None:
                kwargs = dict(pred_scores=all_scores[b][valid], pred_boxes_xyxy=all_boxes[b][valid])
            res: AssignResult = self.assigner.assign(anchors[valid], n_valid_level, tgt.boxes.to(anchors.dtype),
                                                     tgt.labels, self.num_classes, **kwargs)
            labels = torch.full((num_anchors,), self.num_classes, dtype=torch.int64, device=device)
            gidx = torch.full((num_anchors,), -1, dtype=torch.int64, device=device)
            iou = anchors.new_zeros((num_anchors,))
            boxes = anchors.new_zeros((num_anchors, 4))
            labels[valid] = res.labels
            gidx[valid] = res.gt_index
            iou[valid] = res.max_iou.to(iou.dtype)
            pos = gidx >= 0
            boxes[pos] = tgt.boxes.to(boxes.dtype)[gidx[pos]]
            valid_l.append(valid)
            labels_l.append(labels)
            weights_l.append(valid.to(anchors.dtype))
            boxes_l.append(boxes)
            gidx_l.append(gidx)
            iou_l.append(iou)
            npos.append(int(pos.sum()))
        return ATSSTargets(anchors, num_per_level, torch.stack(valid_l), torch.stack(labels_l),
                           torch.stack(weights_l), torch.stack(boxes_l), torch.stack(gidx_l), torch.stack(iou_l), npos)

    def _flat_predictions(self, outputs, anchors: Tensor) -> tuple[Tensor, Tensor]:
        cls_scores, bbox_preds, _ = outputs
        b = cls_scores[0].shape[0]
        scores = torch.cat([c.detach().permute(0, 2, 3, 1).reshape(b, -1, self.num_classes) for c in cls_scores], 1)
        deltas = torch.cat([d.detach().permute(0, 2, 3, 1).reshape(b, -1, 4) for d in bbox_preds], 1)
        return scores.sigmoid(), self.coder.decode(anchors, deltas)

    # ------------------------------------------------------------------ losses
    def loss_per_level(self, outputs: tuple[list[Tensor], list[Tensor], list[Tensor]],
                       targets: ATSSTargets) -> dict[str, list[Tensor]]:
        """Weighted (incl. ``loss_scale``) per-level losses, exactly the official per-level values."""
        cls_scores, bbox_preds, centernesses = outputs
        device = cls_scores[0].device
        num_total = sum(max(n, 1) for n in targets.num_pos)
        avg = reduce_mean(torch.tensor(float(num_total), dtype=torch.float32, device=device)).item()
        avg = max(avg, 1.0)

        losses_cls, losses_bbox, losses_ctr, ctr_sums = [], [], [], []
        start = 0
        for lvl, n in enumerate(targets.num_per_level):
            sl = slice(start, start + n)
            start += n
            b = cls_scores[lvl].shape[0]
            # float32 losses under autocast (official ``@force_fp32``)
            cls = cls_scores[lvl].float().permute(0, 2, 3, 1).reshape(-1, self.num_classes)
            reg = bbox_preds[lvl].float().permute(0, 2, 3, 1).reshape(-1, 4)
            ctr = centernesses[lvl].float().permute(0, 2, 3, 1).reshape(-1)
            anchors = targets.anchors[sl].unsqueeze(0).expand(b, -1, -1).reshape(-1, 4)
            labels = targets.labels[:, sl].reshape(-1)
            weights = targets.label_weights[:, sl].reshape(-1)
            boxes = targets.bbox_targets[:, sl].reshape(-1, 4)

            focal = sigmoid_focal_loss_mmdet(cls, labels, self.focal_alpha, self.focal_gamma) * weights[:, None]
            losses_cls.append(self.loss_cls_weight * (focal.sum() / (avg + _FLOAT_EPS)))

            pos = ((labels >= 0) & (labels < self.num_classes)).nonzero().squeeze(1)
            if pos.numel() > 0:
                pos_anchors = anchors[pos]
                pos_boxes = boxes[pos]
                ctr_t = centerness_target(pos_anchors, pos_boxes)
                decoded = self.coder.decode(pos_anchors, reg[pos])
                giou = giou_loss_mmdet(decoded, pos_boxes, eps=1e-7)
                if bool((ctr_t > 0).any()):
                    lb = self.loss_bbox_weight * ((giou * ctr_t).sum() / (1.0 + _FLOAT_EPS))
                else:  # official GIoULoss shortcut when every weight is zero
                    lb = self.loss_bbox_weight * (decoded * ctr_t[:, None]).sum()
                bce = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t, reduction="none")
                lc = self.loss_centerness_weight * (bce.sum() / (avg + _FLOAT_EPS))
                ctr_sums.append(ctr_t.sum())
            else:
                lb = reg.sum() * 0
                lc = ctr.sum() * 0
                ctr_sums.append(reg.new_tensor(0.0))
            losses_bbox.append(lb)
            losses_ctr.append(lc)

        bbox_avg = reduce_mean(torch.stack(ctr_sums).sum().detach()).clamp(min=1).item()
        s = self.loss_scale
        return {
            "loss_cls": [x * s for x in losses_cls],
            "loss_bbox": [x / bbox_avg * s for x in losses_bbox],
            "loss_centerness": [x * s for x in losses_ctr],
        }

    def positive_coords(self, pyramid: FeaturePyramid, targets: ATSSTargets) -> PositiveCoords:
        """Official ``pos_coords``: all anchors (invalid zeroed), labels, GT targets, per-anchor cell features."""
        bsz = targets.labels.shape[0]
        refs = [torch.where(targets.valid[b][:, None], targets.anchors, torch.zeros_like(targets.anchors))
                for b in range(bsz)]
        feats = [torch.cat([m[b].flatten(1) for m in pyramid.maps], dim=1).t() for b in range(bsz)]
        return PositiveCoords(
            tag=self.tag,
            ref_boxes_xyxy=refs,
            labels=[targets.labels[b] for b in range(bsz)],
            target_boxes_xyxy=[targets.bbox_targets[b] for b in range(bsz)],
            feats=feats,
        )

    def loss(self, pyramid: FeaturePyramid, batch: Batch) -> AuxHeadOutput:
        outputs = self(pyramid)
        targets = self.get_targets(pyramid, batch, outputs)
        per_level = self.loss_per_level(outputs, targets)
        losses = {k: torch.stack(v).sum() for k, v in per_level.items()}
        return AuxHeadOutput(losses=losses, positives=self.positive_coords(pyramid, targets))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, pyramid: FeaturePyramid, batch: Batch) -> list[Detections]:
        """One-stage detections (network-input frame), official ATSS test pipeline."""
        cls_scores, bbox_preds, centernesses = self(pyramid)
        strides = self._pyramid_strides(pyramid)
        gen = self.anchor_generator(strides)
        device = cls_scores[0].device
        level_anchors = gen.grid_anchors(pyramid.spatial_shapes, device=device)
        results = []
        for b in range(len(batch)):
            size_hw = batch.image_sizes[b].tolist()
            boxes_l, scores_l, labels_l = [], [], []
            for lvl, anchors in enumerate(level_anchors):
                scores = cls_scores[lvl][b].permute(1, 2, 0).reshape(-1, self.num_classes).sigmoid()
                deltas = bbox_preds[lvl][b].permute(1, 2, 0).reshape(-1, 4)
                factor = centernesses[lvl][b].permute(1, 2, 0).reshape(-1).sigmoid()
                valid_mask = scores > self.score_thr
                kept = scores[valid_mask]
                idxs = torch.nonzero(valid_mask)
                k = min(self.nms_pre, idxs.shape[0])
                kept, order = kept.sort(descending=True)
                kept = kept[:k]
                top = idxs[order[:k]]
                keep_idx, labels = top.unbind(dim=1)
                boxes = self.coder.decode(anchors[keep_idx], deltas[keep_idx], max_shape=size_hw)
                boxes_l.append(boxes)
                scores_l.append(kept * factor[keep_idx])
                labels_l.append(labels)
            boxes = torch.cat(boxes_l)
            scores = torch.cat(scores_l)
            labels = torch.cat(labels_l)
            if self.min_bbox_size is not None and boxes.numel() > 0:
                w = boxes[:, 2] - boxes[:, 0]
                h = boxes[:, 3] - boxes[:, 1]
                ok = (w > self.min_bbox_size) & (h > self.min_bbox_size)
                if not bool(ok.all()):
                    boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
            if boxes.numel() > 0:
                keep = batched_nms(boxes, scores, labels, self.nms_iou)[: self.max_per_img]
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            results.append(Detections(boxes.float(), scores.float(), labels.long()))
        return results


# --------------------------------------------------------------------------- weights
def official_atss_key_map(key: str, index: int = 0) -> str | None:
    """Official (``CoATSSHead`` in ``bbox_head[index]``) state-dict key -> :class:`ATSSHead` key.

    The module names are the official ones, so the map only strips ``bbox_head.<index>.``:
    ``bbox_head.0.cls_convs.0.conv.weight -> cls_convs.0.conv.weight``, ``.gn.*``, ``atss_cls.*``,
    ``atss_reg.*``, ``atss_centerness.*``, ``scales.<l>.scale``. Other keys give ``None``.
    """
    prefix = f"bbox_head.{index}."
    return key[len(prefix):] if key.startswith(prefix) else None


def official_atss_state_dict(state_dict: dict[str, Tensor], index: int = 0) -> dict[str, Tensor]:
    """The ``bbox_head.<index>.*`` entries of an official state dict, renamed for :class:`ATSSHead`."""
    return {nk: v for k, v in state_dict.items() if (nk := official_atss_key_map(k, index)) is not None}


# --------------------------------------------------------------------------- component
def _pyramid_levels(cfg: ATSSHeadConfig) -> int | None:
    if cfg.strides is not None:
        if cfg.pyramid_levels is not None and cfg.pyramid_levels != len(cfg.strides):
            raise ValueError(f"ATSSHeadConfig: pyramid_levels={cfg.pyramid_levels} but {len(cfg.strides)} strides")
        return len(cfg.strides)
    if cfg.pyramid_levels is not None:
        return cfg.pyramid_levels
    if cfg.num_levels is not None:
        return cfg.num_levels + 1  # the multi-scale adapter adds one level (official)
    return None


def build_atss_head(cfg: ATSSHeadConfig, loss_scale: float = 1.0) -> ATSSHead:
    """``codetr.aux_heads`` builder. ``loss_scale``: set by the Co-DETR branch to ``lambda_2 * num_decoder_layers``.

    The ``assigner`` slot takes any registered one-to-many assigner (built through the registry, so plugin
    assigners work here exactly like ``atss``).
    """
    cfg.require_shared("num_classes", "hidden_dim")
    assigner = build_one_to_many(cfg.assigner, f"aux_heads[{cfg.type}].assigner")
    return ATSSHead(cfg, assigner=assigner, loss_scale=loss_scale)


COMPONENT = Component(config=ATSSHeadConfig, build=build_atss_head,
                      summary="ATSS one-stage auxiliary head (Co-DETR CoATSSHead), anchors + ATSS assignment")
