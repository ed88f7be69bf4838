"""Faster R-CNN auxiliary head of Co-DETR (RPN + one RoI head), official-parity implementation.

Official counterpart: ``RPNHead`` + ``CoStandardRoIHead`` with ``Shared2FCBBoxHead`` in Sense-X/Co-DETR
(MMDetection 2.25.3) and the MMDetection 3.x port (co_detr.md §B1, §B2.1, §B6.2). Training step
(:meth:`FasterRCNNHead.loss`) per batch:

1. **RPN** on *every* pyramid level: 9 anchors per location (``octave_base_scale`` 4, 3 scales, ratios
   0.5/1/2, centre offset 0). Per image, anchors outside the valid image (MMDetection ceil rule) are
   dropped, the rest are assigned class-agnostically by the ``rpn_assigner`` slot (default
   :class:`MaxIoUAssigner` 0.7 / 0.3 / 0.3, low-quality matches; any registered one-to-many assigner) and sampled by :class:`RandomSampler` (256, 50 % positives, no GT added).
   ``loss_rpn_cls``: sigmoid BCE over the sampled anchors; ``loss_rpn_bbox``: L1 on DeltaXYWH deltas
   (stds 1) of the positives; both divided by ``sum_b max(#pos_b, 1) + sum_b max(#neg_b, 1)`` and
   computed per level then summed (the official loss dict lists one value per level).
2. **Proposals** (detached): per level the ``nms_pre`` (4000) best anchors, decode + clip, NMS 0.7 across
   levels with the level as the class, top 1000 (:func:`codetr.heads.rpn.rpn_proposals`).
3. **RoI head**: per image, proposals are assigned by the ``roi_assigner`` slot (default
   :class:`MaxIoUAssigner` 0.5 / 0.5 / 0.5, no low-quality matches) against the class labels and sampled by :class:`RandomSampler` (512, 25 %
   positives, **GT boxes added as proposals**). Sampled RoIs (positives then negatives) are RoIAligned
   7x7 from ``roi_strides`` (default: all pyramid levels but the last) and classified by
   :class:`Shared2FCBBoxHead`. ``loss_cls``: softmax CE over ``num_classes + 1`` classes averaged over
   the sampled RoIs; ``loss_bbox``: GIoU between the class-specific **decoded** box (DeltaXYWH, stds
   0.1/0.1/0.2/0.2, no clipping) and its GT, summed over positives and divided by the total number of
   sampled RoIs (MMDetection ``avg_factor=bbox_targets.size(0)``).
4. **PositiveCoords** (tag ``"rcnn"``): per image the sampled RoIs (positives then negatives, GT boxes
   first among the positives), truncated to the smallest sampled count of the batch; labels
   (background = ``num_classes``); targets = assigned GT boxes (zeros for negatives); feats = the 7x7
   RoI features mean-pooled over space (not detached).

Loss weights: every loss is ``base_weight * loss_scale``; the base weights are the recipe's
(RPN CE 1, RPN L1 1, RoI CE 1, RoI GIoU 10) and ``loss_scale`` is set by the Co-DETR builder to
``lambda_2 * num_decoder_layers`` (official: 12; the small fixtures: 4).

Metrics: the RoI classification accuracy (``acc``, in percent, official ``acc0``) is **not** a loss and
is therefore not in :attr:`AuxHeadOutput.losses` (the detector sums every entry there); it is published,
detached, in :attr:`FasterRCNNHead.metrics` together with the per-level RPN losses and sample counts.

Randomness: the samplers draw with ``torch.randperm`` on :attr:`FasterRCNNHead.generator` (None = the
global CPU RNG, the official behaviour), RPN images first, then RoI images -- the official consumption
order, so ``torch.manual_seed(s)`` before the step reproduces the official seed-``s`` samples when
nothing else draws random numbers in between.

State dict: ``rpn_head.*`` equals the official keys; the official ``roi_head.0.bbox_head.*`` keys are
``roi_head.bbox_head.*`` here (see :func:`official_faster_rcnn_key_map`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import Tensor, nn

from codetr.assigners import build_one_to_many
from codetr.assigners.max_iou import MaxIoUAssignerConfig
from codetr.assigners.sampler import RandomSampler, SamplingResult
from codetr.core.interfaces import AuxHead, AuxHeadOutput, FeaturePyramid, PositiveCoords
from codetr.core.registry import Component, ComponentConfig, component_field
from codetr.core.structures import Batch, Detections
from codetr.heads.anchors import AnchorGenerator, anchor_inside_flags
from codetr.heads.box_coder import DeltaXYWHCoder
from codetr.heads.losses import giou_loss_mmdet
from codetr.ops.nms import multiclass_nms
from codetr.heads.roi_head import RoIExtractor, Shared2FCBBoxHead, boxes_to_rois
from codetr.heads.rpn import ProposalSettings, RPNConvHead, rpn_proposals

__all__ = [
    "RandomSamplerConfig",
    "ProposalConfig",
    "RCNNTestConfig",
    "FasterRCNNHeadConfig",
    "FasterRCNNHead",
    "official_faster_rcnn_key_map",
    "convert_official_faster_rcnn_state_dict",
    "build",
    "COMPONENT",
]

_EPS = torch.finfo(torch.float32).eps  # MMDetection weight_reduce_loss: sum / (avg_factor + eps)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RandomSamplerConfig(_Strict):
    num: int = Field(ge=1)
    pos_fraction: float = Field(ge=0, le=1)
    neg_pos_ub: float = -1
    add_gt_as_proposals: bool = True


class ProposalConfig(_Strict):
    nms_pre: int = Field(description="per-level candidates kept before NMS (<= 0: all)")
    max_per_img: int = Field(ge=1)
    iou_threshold: float = Field(0.7, gt=0, le=1)
    min_bbox_size: float = Field(0.0, description="boxes with w or h <= this are dropped (< 0: no filter)")


class RCNNTestConfig(_Strict):
    score_thr: float = Field(0.0, ge=0, le=1)
    iou_threshold: float = Field(0.5, gt=0, le=1)
    max_per_img: int = Field(100, ge=1)


class FasterRCNNHeadConfig(ComponentConfig):
    """Faster R-CNN aux head (defaults: the Co-DETR recipes; ``num_classes``/``hidden_dim`` injected)."""

    type: Literal["faster_rcnn"] = "faster_rcnn"
    num_classes: int | None = None
    hidden_dim: int | None = Field(None, description="input channels of the pyramid")
    # ---- RPN
    feat_channels: int = Field(256, ge=1)
    anchor_octave_base_scale: float = Field(4.0, gt=0)
    anchor_scales_per_octave: int = Field(3, ge=1)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_center_offset: float = Field(0.0, ge=0, le=1)
    rpn_target_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    rpn_assigner: component_field("assigners") = Field(default_factory=lambda: MaxIoUAssignerConfig(
        pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True),
        description="any one-to-many assigner (class-agnostic: all GT labels 0, 1 class)")
    rpn_sampler: RandomSamplerConfig = RandomSamplerConfig(num=256, pos_fraction=0.5, add_gt_as_proposals=False)
    rpn_allowed_border: float = Field(-1.0, description="< 0: every valid anchor is a training candidate")
    rpn_train_proposals: ProposalConfig = ProposalConfig(nms_pre=4000, max_per_img=1000, iou_threshold=0.7)
    rpn_test_proposals: ProposalConfig = ProposalConfig(nms_pre=1000, max_per_img=1000, iou_threshold=0.7)
    # ---- RoI head
    roi_strides: tuple[int, ...] | None = Field(
        None, description="pyramid strides pooled by RoIAlign; None = every level but the last "
                          "(official: Co-Deformable [8,16,32,64], Co-DINO [4,8,16,32,64])")
    roi_output_size: int = Field(7, ge=1)
    roi_sampling_ratio: int = Field(0, ge=0)
    roi_aligned: bool = True
    finest_scale: float = Field(56.0, gt=0, description="MMDetection default 56 (Co-DINO); Co-Deformable uses 112")
    fc_out_channels: int = Field(1024, ge=1)
    num_shared_fcs: int = Field(2, ge=1)
    reg_class_agnostic: bool = False
    roi_target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    roi_assigner: component_field("assigners") = Field(default_factory=lambda: MaxIoUAssignerConfig(
        pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False),
        description="any one-to-many assigner of the proposals (class labels)")
    roi_sampler: RandomSamplerConfig = RandomSamplerConfig(num=512, pos_fraction=0.25, add_gt_as_proposals=True)
    test: RCNNTestConfig = RCNNTestConfig()
    # ---- base loss weights (multiplied by loss_scale = lambda_2 * num_decoder_layers)
    loss_rpn_cls_weight: float = Field(1.0, ge=0)
    loss_rpn_bbox_weight: float = Field(1.0, ge=0)
    loss_cls_weight: float = Field(1.0, ge=0)
    loss_bbox_weight: float = Field(10.0, ge=0)
    max_positive_coords: int = Field(2000, ge=1, description="cap of the PositiveCoords count (official 2000)")

    @field_validator("rpn_assigner", "roi_assigner", "rpn_sampler", "roi_sampler", "rpn_train_proposals",
                     "rpn_test_proposals", "test", mode="before")
    @classmethod
    def _merge_with_default(cls, v: object, info: ValidationInfo) -> object:
        """A partial mapping overrides only the keys it names (the other keys keep *this field's* default,
        e.g. ``roi_assigner: {pos_iou_thr: 0.6}`` keeps 0.5 / 0.5 / no low-quality matching). An assigner
        mapping naming another ``type`` (e.g. a plugin) is taken as written."""
        if isinstance(v, dict):
            default = cls.model_fields[info.field_name].get_default(call_default_factory=True)
            if v.get("type", getattr(default, "type", None)) != getattr(default, "type", None):
                return v
            return {**default.model_dump(), **v}
        return v


# --------------------------------------------------------------------------- loss helpers (mmdet style)
def _reduce(loss: Tensor, weight: Tensor, avg_factor: float) -> Tensor:
    return (loss * weight).sum() / (avg_factor + _EPS)


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    pred = logits.topk(1, dim=1).indices[:, 0]
    return (pred == labels).float().sum() * (100.0 / logits.shape[0])


class FasterRCNNHead(AuxHead):
    """RPN + RoI head; see the module docstring.

    Args:
        cfg: the head config (``num_classes`` and ``hidden_dim`` must be resolved).
        loss_scale: multiplies every base loss weight (Co-DETR: ``lambda_2 * num_decoder_layers``).

    Attributes:
        generator: ``torch.Generator`` of the samplers, None = global RNG (official).
        metrics: detached diagnostics of the last :meth:`loss` call (``acc``, ``loss_rpn_cls_levels``,
            ``loss_rpn_bbox_levels``, ``rpn_num_pos``, ``rpn_num_neg``, ``roi_num_pos``, ``roi_num_neg``).
        record_internals: when True, :attr:`internals` keeps the last call's proposals and sampling
            results (for tests and debugging).
    """

    tag = "rcnn"

    def __init__(self, cfg: FasterRCNNHeadConfig, loss_scale: float = 1.0):
        super().__init__()
        cfg.require_shared("num_classes", "hidden_dim")
        self.cfg = cfg
        self.num_classes = int(cfg.num_classes)
        self.loss_scale = float(loss_scale)
        self.num_anchors = len(cfg.anchor_ratios) * cfg.anchor_scales_per_octave
        self.rpn_head = RPNConvHead(cfg.hidden_dim, cfg.feat_channels, self.num_anchors)
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = Shared2FCBBoxHead(
            cfg.hidden_dim, self.num_classes, cfg.roi_output_size, cfg.fc_out_channels, cfg.num_shared_fcs,
            cfg.reg_class_agnostic)
        self.rpn_coder = DeltaXYWHCoder(stds=cfg.rpn_target_stds)
        self.roi_coder = DeltaXYWHCoder(stds=cfg.roi_target_stds)
        self.rpn_assigner = build_one_to_many(cfg.rpn_assigner, "aux_heads[faster_rcnn].rpn_assigner")
        self.roi_assigner = build_one_to_many(cfg.roi_assigner, "aux_heads[faster_rcnn].roi_assigner")
        self.rpn_sampler = RandomSampler(**cfg.rpn_sampler.model_dump())
        self.roi_sampler = RandomSampler(**cfg.roi_sampler.model_dump())
        self._train_props = ProposalSettings(**cfg.rpn_train_proposals.model_dump())
        self._test_props = ProposalSettings(**cfg.rpn_test_proposals.model_dump())
        self._anchor_gens: dict[tuple[int, ...], AnchorGenerator] = {}
        self.generator: torch.Generator | None = None
        self.metrics: dict[str, Tensor] = {}
        self.record_internals = False
        self.internals: dict[str, object] = {}

    # ------------------------------------------------------------------ pieces
    def anchor_generator(self, strides: list[int]) -> AnchorGenerator:
        key = tuple(int(s) for s in strides)
        if key not in self._anchor_gens:
            c = self.cfg
            self._anchor_gens[key] = AnchorGenerator(key, c.anchor_octave_base_scale, c.anchor_scales_per_octave,
                                                     c.anchor_ratios, c.anchor_center_offset)
        return self._anchor_gens[key]

    def anchors(self, pyramid: FeaturePyramid) -> list[Tensor]:
        """L float32 tensors (H_l * W_l * A, 4): the RPN anchors of every level (shared by the batch)."""
        return self.anchor_generator(pyramid.strides).grid_anchors(pyramid.spatial_shapes, pyramid.maps[0].device,
                                                                   torch.float32)

    def roi_levels(self, pyramid: FeaturePyramid) -> tuple[list[Tensor], list[int]]:
        """The maps (and strides) RoIAlign pools from."""
        if self.cfg.roi_strides is None:
            n = max(1, len(pyramid) - 1)
            return list(pyramid.maps[:n]), list(pyramid.strides[:n])
        idx = []
        for s in self.cfg.roi_strides:
            if s not in pyramid.strides:
                raise ValueError(f"faster_rcnn.roi_strides: stride {s} not in the aux pyramid {pyramid.strides}")
            idx.append(pyramid.strides.index(s))
        return [pyramid.maps[i] for i in idx], [pyramid.strides[i] for i in idx]

    def roi_forward(self, pyramid: FeaturePyramid, rois: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(K, 5) RoIs -> (RoI features (K, C, S, S), class logits (K, C'+1), deltas (K, 4C'))."""
        maps, strides = self.roi_levels(pyramid)
        c = self.cfg
        extractor = RoIExtractor(strides, c.roi_output_size, c.roi_sampling_ratio, c.roi_aligned, c.finest_scale)
        feats = extractor(maps, rois)
        cls, reg = self.roi_head.bbox_head(feats)
        return feats, cls, reg

    def proposals(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], anchors: list[Tensor],
                  batch: Batch, train: bool) -> list[Tensor]:
        """B tensors (K_b, 5) detached proposals ``[x1, y1, x2, y2, score]``."""
        settings = self._train_props if train else self._test_props
        out = []
        for b in range(len(batch)):
            h, w = (int(v) for v in batch.image_sizes[b].tolist())
            out.append(rpn_proposals([c[b] for c in cls_scores], [r[b] for r in bbox_preds], anchors, (h, w),
                                     self.rpn_coder, settings))
        return out

    # ------------------------------------------------------------------ RPN loss
    def _rpn_targets(self, anchors_all: Tensor, valid: Tensor, target_boxes: Tensor, ignore_boxes: Tensor,
                     image_size_hw: Tensor, level_sizes: list[int], preds: tuple[Tensor, Tensor] | None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, SamplingResult]:
        """``preds``: this image's (A_all,) objectness logits and (A_all, 4) deltas, level-major like
        ``anchors_all``, given when the assigner ``uses_predictions`` (else None)."""
        inside = anchor_inside_flags(anchors_all, valid, image_size_hw, self.cfg.rpn_allowed_border)
        inside_idx = inside.nonzero(as_tuple=False).squeeze(1)
        anchors = anchors_all[inside_idx]
        per_level = torch.stack([m.sum() for m in inside.split(level_sizes)]).tolist()  # one device sync
        extra = {}
        if preds is not None:
            extra = dict(pred_scores=preds[0][inside_idx, None].sigmoid(),
                         pred_boxes_xyxy=self.rpn_coder.decode(anchors, preds[1][inside_idx]))
        labels = torch.zeros(target_boxes.shape[0], dtype=torch.long, device=target_boxes.device)  # 1 class
        assign = self.rpn_assigner.assign(anchors, per_level, target_boxes, labels, 1, ignore_boxes_xyxy=ignore_boxes,
                                          **extra)
        res = self.rpn_sampler.sample(assign, anchors, target_boxes, None, generator=self.generator)
        n = anchors_all.shape[0]
        labels = torch.ones(n, dtype=torch.long, device=anchors.device)  # 1 = background (1 RPN class)
        label_w = anchors.new_zeros(n)
        box_t = anchors.new_zeros(n, 4)
        box_w = anchors.new_zeros(n, 4)
        pos = inside_idx[res.pos_inds]
        neg = inside_idx[res.neg_inds]
        if pos.numel() > 0:
            box_t[pos] = self.rpn_coder.encode(res.pos_boxes, res.pos_gt_boxes)
            box_w[pos] = 1.0
            labels[pos] = 0
            label_w[pos] = 1.0
        if neg.numel() > 0:
            label_w[neg] = 1.0
        return labels, label_w, box_t, box_w, res

    def _rpn_loss(self, pyramid: FeaturePyramid, cls_scores: list[Tensor], bbox_preds: list[Tensor],
                  anchors: list[Tensor], targets: list[tuple[Tensor, Tensor, Tensor]],
                  batch: Batch) -> tuple[Tensor, Tensor]:
        gen = self.anchor_generator(pyramid.strides)
        sizes = [int(a.shape[0]) for a in anchors]
        anchors_all = torch.cat(anchors)
        per_image, samples = [], []
        for b, (boxes, _, ignore) in enumerate(targets):
            valid = torch.cat(gen.valid_flags(pyramid.spatial_shapes, batch.image_sizes[b], anchors_all.device))
            preds = None
            if self.rpn_assigner.uses_predictions:
                preds = (torch.cat([c[b].detach().permute(1, 2, 0).reshape(-1) for c in cls_scores]),
                         torch.cat([r[b].detach().permute(1, 2, 0).reshape(-1, 4) for r in bbox_preds]))
            t = self._rpn_targets(anchors_all, valid, boxes, ignore, batch.image_sizes[b], sizes, preds)
            per_image.append(t[:4])
            samples.append(t[4])
        num_pos = sum(max(r.num_pos, 1) for r in samples)
        num_neg = sum(max(r.num_neg, 1) for r in samples)
        avg = float(num_pos + num_neg)
        labels, label_w, box_t, box_w = (torch.stack(x) for x in zip(*per_image))
        cls_levels, reg_levels = [], []
        start = 0
        for lvl, (c, r) in enumerate(zip(cls_scores, bbox_preds)):
            end = start + sizes[lvl]
            logit = c.permute(0, 2, 3, 1).reshape(-1)
            delta = r.permute(0, 2, 3, 1).reshape(-1, 4)
            tgt = (labels[:, start:end].reshape(-1) == 0).to(logit.dtype)
            bce = F.binary_cross_entropy_with_logits(logit, tgt, reduction="none")
            cls_levels.append(_reduce(bce, label_w[:, start:end].reshape(-1), avg))
            l1 = (delta - box_t[:, start:end].reshape(-1, 4)).abs()
            reg_levels.append(_reduce(l1, box_w[:, start:end].reshape(-1, 4), avg))
            start = end
        w_cls = self.cfg.loss_rpn_cls_weight * self.loss_scale
        w_reg = self.cfg.loss_rpn_bbox_weight * self.loss_scale
        cls_levels = [w_cls * x for x in cls_levels]
        reg_levels = [w_reg * x for x in reg_levels]
        self.metrics["loss_rpn_cls_levels"] = torch.stack(cls_levels).detach()
        self.metrics["loss_rpn_bbox_levels"] = torch.stack(reg_levels).detach()
        self.metrics["rpn_num_pos"] = torch.tensor(float(sum(r.num_pos for r in samples)))
        self.metrics["rpn_num_neg"] = torch.tensor(float(sum(r.num_neg for r in samples)))
        if self.record_internals:
            self.internals["rpn_sampling"] = samples
        return sum(cls_levels), sum(reg_levels)

    # ------------------------------------------------------------------ AuxHead API
    @staticmethod
    def _training_targets(batch: Batch, device: torch.device) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image (boxes, labels, crowd boxes): crowd GT never is a target; its boxes only act as
        ignore regions when an assigner sets ``ignore_iof_thr > 0`` (MMDetection ``gt_bboxes_ignore``)."""
        out = []
        for t in batch.targets:
            crowd = t.iscrowd.to(torch.bool)
            out.append((t.boxes[~crowd].float().to(device), t.labels[~crowd].long().to(device),
                        t.boxes[crowd].float().to(device)))
        return out

    def loss(self, pyramid: FeaturePyramid, batch: Batch) -> AuxHeadOutput:
        self.metrics = {}
        self.internals = {}
        targets = self._training_targets(batch, pyramid.maps[0].device)

        cls_scores, bbox_preds = self.rpn_head(pyramid.maps)
        anchors = self.anchors(pyramid)
        loss_rpn_cls, loss_rpn_bbox = self._rpn_loss(pyramid, cls_scores, bbox_preds, anchors, targets, batch)
        proposals = self.proposals(cls_scores, bbox_preds, anchors, batch, train=True)

        samples: list[SamplingResult] = []
        for b, (boxes, labels, ignore) in enumerate(targets):
            props = proposals[b][:, :4]
            assign = self.roi_assigner.assign(props, None, boxes, labels, self.num_classes, ignore_boxes_xyxy=ignore)
            samples.append(self.roi_sampler.sample(assign, props, boxes, labels, generator=self.generator))
        if self.record_internals:
            self.internals["proposals"] = proposals
            self.internals["roi_sampling"] = samples

        rois = boxes_to_rois([s.boxes for s in samples])
        roi_feats, cls_score, bbox_pred = self.roi_forward(pyramid, rois)
        loss_cls, loss_bbox, labels_all, box_targets = self._roi_loss(samples, rois, cls_score, bbox_pred)

        losses = {"loss_rpn_cls": loss_rpn_cls, "loss_rpn_bbox": loss_rpn_bbox,
                  "loss_cls": loss_cls, "loss_bbox": loss_bbox}
        positives = self._positive_coords(samples, roi_feats, labels_all, box_targets)
        return AuxHeadOutput(losses=losses, positives=positives)

    def _roi_loss(self, samples: list[SamplingResult], rois: Tensor, cls_score: Tensor, bbox_pred: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        labels, label_w, box_t, box_w = [], [], [], []
        for s in samples:
            n = s.num_pos + s.num_neg
            lab = torch.full((n,), self.num_classes, dtype=torch.long, device=rois.device)
            bt = rois.new_zeros(n, 4)
            bw = rois.new_zeros(n, 4)
            if s.num_pos > 0:
                lab[:s.num_pos] = s.pos_labels
                bt[:s.num_pos] = s.pos_gt_boxes
                bw[:s.num_pos] = 1.0
            labels.append(lab)
            label_w.append(rois.new_ones(n))
            box_t.append(bt)
            box_w.append(bw)
        labels_all = torch.cat(labels)
        label_w_all = torch.cat(label_w)
        box_t_all = torch.cat(box_t)
        box_w_all = torch.cat(box_w)

        w_cls = self.cfg.loss_cls_weight * self.loss_scale
        w_reg = self.cfg.loss_bbox_weight * self.loss_scale
        if cls_score.numel() > 0:
            avg = max(float((label_w_all > 0).sum().item()), 1.0)
            ce = F.cross_entropy(cls_score, labels_all, reduction="none")
            loss_cls = w_cls * _reduce(ce, label_w_all, avg)
        else:
            loss_cls = cls_score.sum() * 0.0
        pos = (labels_all >= 0) & (labels_all < self.num_classes)
        if bool(pos.any()):
            decoded = self.roi_coder.decode(rois[:, 1:], bbox_pred.float())  # fp32, no clipping (official loss)
            if self.cfg.reg_class_agnostic:
                pos_pred = decoded.view(decoded.shape[0], 4)[pos]
            else:
                pos_pred = decoded.view(decoded.shape[0], -1, 4)[pos, labels_all[pos]]
            giou = giou_loss_mmdet(pos_pred, box_t_all[pos], eps=1e-6)
            loss_bbox = w_reg * _reduce(giou, box_w_all[pos].mean(-1), float(box_t_all.shape[0]))
        else:
            loss_bbox = bbox_pred[pos].sum()
        self.metrics["acc"] = _accuracy(cls_score.detach(), labels_all)
        self.metrics["roi_num_pos"] = torch.tensor(float(sum(s.num_pos for s in samples)))
        self.metrics["roi_num_neg"] = torch.tensor(float(sum(s.num_neg for s in samples)))
        return loss_cls, loss_bbox, labels_all, box_t_all

    def _positive_coords(self, samples: list[SamplingResult], roi_feats: Tensor, labels_all: Tensor,
                         box_targets: Tensor) -> PositiveCoords:
        counts = [s.num_pos + s.num_neg for s in samples]
        keep = min([self.cfg.max_positive_coords, *counts])
        pooled = roi_feats.mean(-1).mean(-1)
        refs, labels, tgts, feats = [], [], [], []
        start = 0
        for s, n in zip(samples, counts):
            refs.append(s.boxes[:keep].detach())
            labels.append(labels_all[start:start + n][:keep])
            tgts.append(box_targets[start:start + n][:keep])
            feats.append(pooled[start:start + n][:keep])
            start += n
        return PositiveCoords(tag=self.tag, ref_boxes_xyxy=refs, labels=labels, target_boxes_xyxy=tgts, feats=feats)

    @torch.no_grad()
    def predict(self, pyramid: FeaturePyramid, batch: Batch) -> list[Detections]:
        """Two-stage detections (``eval_module: two-stage``) in the network-input frame."""
        cls_scores, bbox_preds = self.rpn_head(pyramid.maps)
        anchors = self.anchors(pyramid)
        proposals = self.proposals(cls_scores, bbox_preds, anchors, batch, train=False)
        return self.predict_from_proposals(pyramid, batch, proposals)

    @torch.no_grad()
    def predict_from_proposals(self, pyramid: FeaturePyramid, batch: Batch, proposals: list[Tensor]
                               ) -> list[Detections]:
        """RoI head inference from given (K_b, 4+) proposals (mmdet ``simple_test_bboxes``, no rescale)."""
        rois = boxes_to_rois(proposals)
        _, cls_score, bbox_pred = self.roi_forward(pyramid, rois)
        scores = F.softmax(cls_score.float(), dim=-1)
        t = self.cfg.test
        out = []
        for b in range(len(batch)):
            sel = rois[:, 0] == b
            h, w = (int(v) for v in batch.image_sizes[b].tolist())
            boxes = self.roi_coder.decode(rois[sel, 1:], bbox_pred[sel].float(), max_shape=(h, w))
            det_boxes, det_scores, det_labels = multiclass_nms(boxes, scores[sel], t.score_thr, t.iou_threshold,
                                                               t.max_per_img)
            out.append(Detections(det_boxes, det_scores, det_labels))
        return out


# --------------------------------------------------------------------------- official weights
def official_faster_rcnn_key_map(key: str, roi_index: int = 0) -> str | None:
    """Official (MMDetection Co-DETR) state-dict key -> :class:`FasterRCNNHead` key, None if not ours.

    ``rpn_head.X -> rpn_head.X`` (identical) and ``roi_head.{roi_index}.bbox_head.X -> roi_head.bbox_head.X``.
    """
    if key.startswith("rpn_head."):
        return key
    prefix = f"roi_head.{roi_index}."
    if key.startswith(prefix):
        return "roi_head." + key[len(prefix):]
    return None


def convert_official_faster_rcnn_state_dict(state_dict: dict[str, Tensor], roi_index: int = 0) -> dict[str, Tensor]:
    """The Faster R-CNN part of an official Co-DETR state dict, renamed for :class:`FasterRCNNHead`."""
    return {nk: v for k, v in state_dict.items() if (nk := official_faster_rcnn_key_map(k, roi_index)) is not None}


def build(cfg: FasterRCNNHeadConfig, loss_scale: float = 1.0) -> FasterRCNNHead:
    return FasterRCNNHead(cfg, loss_scale)


COMPONENT = Component(
    config=FasterRCNNHeadConfig,
    build=build,
    summary="Faster R-CNN aux head (RPN + Shared2FC RoI head, Max-IoU + random sampling; official parity)",
)
