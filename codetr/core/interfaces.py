"""The four pluggable interfaces of codetr and the tensors they exchange.

Data flow of one training step (``Detector.loss``)::

    images ─backbone─> C_l ─neck─> levels ─variant.prepare─> EncoderInputs ─variant.encode─> Memory
    Memory ─variant.make_queries─> QueryGroup "main" (+ "dn") ─variant.decode─> DecoderOutputs ─> criterion
    Memory ─adapter─> FeaturePyramid ─aux_head[k].loss─> losses_k, PositiveCoords_k
    PositiveCoords_k ─query_encoder(k)─> QueryGroup "aux{k}" + AuxTargets ─variant.decode─> losses (x lambda_1)

Inference runs only the first two lines (the DETR branch).

Frames and formats (see also :mod:`codetr.core.structures`):

* ``FeaturePyramid`` maps are NCHW; level ``l`` has stride ``strides[l]`` in input pixels.
* Anything named ``*_xyxy`` is absolute pixels in the transformed (network-input) frame.
* ``reference`` / ``boxes`` of queries and decoder outputs are **normalised cxcywh** in [0, 1] relative
  to each image's valid size (``Batch.image_sizes``); "unact" tensors are their inverse sigmoid.
* Background label = ``num_classes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from codetr.core.structures import Batch, Detections

__all__ = [
    "FeaturePyramid",
    "EncoderInputs",
    "Memory",
    "QueryGroup",
    "DecoderOutputs",
    "PositiveCoords",
    "AuxTargets",
    "AuxHeadOutput",
    "MatchResult",
    "AssignResult",
    "OneToOneAssigner",
    "OneToManyAssigner",
    "Assigner",
    "AuxHead",
    "QueryEncoder",
    "DETRVariant",
    "Criterion",
    "CriterionOutput",
    "EXTRAS_ENC_LOGITS",
    "EXTRAS_ENC_BOXES",
    "EXTRAS_ENC_LOGITS_ALL",
    "EXTRAS_ENC_BOXES_UNACT_ALL",
    "EXTRAS_ENC_PROPOSALS_UNACT",
    "EXTRAS_ENC_VALID",
    "EXTRAS_TOPK_INDICES",
    "EXTRAS_TOPK_BOXES_UNACT",
]


# --------------------------------------------------------------------------- Memory.extras keys
# Two-stage proposal tensors a variant's ``encode`` puts in ``Memory.extras``. One key = one meaning in every
# variant (Deformable-DETR two-stage / ++, DINO, and the variants built on them). S = number of encoder tokens,
# k = number of selected proposals (the decoder's queries), C' = classes of the encoder head. Boxes are in the
# frame of query references: normalised cxcywh relative to each image's valid size (a grid proposal's centre
# is ``(i + 0.5) / valid cells`` of its level); "unact" = inverse sigmoid (logit space).

#: (B, N, C') logits of the proposals the **encoder loss** trains (``SetCriterion`` with ``enc_loss`` != "none").
#: Which proposals is the variant's official choice: every token (N = S; Deformable-DETR two-stage /
#: Co-Deformable-DETR, class-agnostic "binary" loss) or the selected top-k (N = k; DINO / Co-DINO, "class" loss).
EXTRAS_ENC_LOGITS = "enc_logits"
#: (B, N, 4) normalised cxcywh boxes (sigmoid, with gradient) of the same N proposals as ``EXTRAS_ENC_LOGITS``.
EXTRAS_ENC_BOXES = "enc_boxes"
#: (B, S, C') encoder-head logits of **every** token (top-k selection and inspection; with gradient).
EXTRAS_ENC_LOGITS_ALL = "enc_logits_all"
#: (B, S, 4) refined proposal of every token in logit space: ``box_head(token) + grid proposal``; +inf where
#: the proposal is invalid (see ``EXTRAS_ENC_VALID``).
EXTRAS_ENC_BOXES_UNACT_ALL = "enc_boxes_unact_all"
#: (B, S, 4) the unrefined grid proposal of every token in logit space (+inf where invalid).
EXTRAS_ENC_PROPOSALS_UNACT = "enc_proposals_unact"
#: (B, S) bool, False where the token is padding or its grid proposal lies outside (0.01, 0.99).
EXTRAS_ENC_VALID = "enc_valid"
#: (B, k) int64 token index of each selected proposal (best first); ``k = min(#proposals, S)``.
EXTRAS_TOPK_INDICES = "topk_indices"
#: (B, k, 4) the selected refined proposals in logit space, **detached**: the decoder's initial reference
#: boxes are their sigmoid.
EXTRAS_TOPK_BOXES_UNACT = "topk_boxes_unact"


# --------------------------------------------------------------------------- tensors exchanged
@dataclass
class FeaturePyramid:
    """Multi-level feature maps.

    Attributes:
        maps: L tensors (B, C, H_l, W_l).
        strides: L ints, input pixels per cell of each level.
        masks: L bool tensors (B, H_l, W_l), True on padding (cells outside the valid image).
    """

    maps: list[Tensor]
    strides: list[int]
    masks: list[Tensor]

    def __len__(self) -> int:
        return len(self.maps)

    @property
    def spatial_shapes(self) -> list[tuple[int, int]]:
        return [(int(m.shape[-2]), int(m.shape[-1])) for m in self.maps]


@dataclass
class EncoderInputs:
    """Flattened multi-level encoder input (output of ``DETRVariant.prepare``).

    Attributes:
        feats: (B, S, C) tokens of all levels concatenated in level order, row-major inside a level.
        pos: (B, S, C) positional encoding (+ level embedding) of each token.
        padding_mask: (B, S) bool, True on padded tokens.
        spatial_shapes: L python (H_l, W_l) tuples (python ints: no host sync in attention).
        level_start: (L,) int64 start offset of each level in S.
        valid_ratios: (B, L, 2) float, (w, h) fraction of each level covered by the valid image.
        strides: L ints.
    """

    feats: Tensor
    pos: Tensor
    padding_mask: Tensor
    spatial_shapes: list[tuple[int, int]]
    level_start: Tensor
    valid_ratios: Tensor
    strides: list[int]


@dataclass
class Memory:
    """Encoder output.

    Attributes:
        memory: (B, S, C) encoded tokens, same layout as ``inputs.feats``.
        inputs: the :class:`EncoderInputs` the encoder consumed (shapes, masks, ratios).
        extras: variant-specific tensors, keyed by the ``EXTRAS_*`` constants of this module (two-stage
            proposals: ``EXTRAS_ENC_LOGITS`` / ``EXTRAS_ENC_BOXES`` are what the criterion's encoder loss
            trains; ``EXTRAS_TOPK_*`` the selected proposals; ``EXTRAS_ENC_*_ALL`` every token).
    """

    memory: Tensor
    inputs: EncoderInputs
    extras: dict[str, Tensor] = field(default_factory=dict)

    def levels(self) -> list[Tensor]:
        """Split back into L maps (B, C, H_l, W_l) (the multi-scale adapter's input)."""
        b, _, c = self.memory.shape
        out, start = [], 0
        for h, w in self.inputs.spatial_shapes:
            out.append(self.memory[:, start:start + h * w].transpose(1, 2).reshape(b, c, h, w))
            start += h * w
        return out


@dataclass
class QueryGroup:
    """One group of decoder queries decoded together by the shared decoder.

    Attributes:
        name: "main", "dn", "aux0", ... (used as the loss-name prefix/suffix).
        content: (B, Q, C) content queries (target embedding).
        reference: (B, Q, 4) normalised cxcywh reference boxes (or (B, Q, 2) points for variants with
            2-D references).
        pos: (B, Q, C) positional queries, or None for variants that derive them from ``reference``
            at every layer (DINO, DAB).
        self_attn_mask: None or bool (Q, Q) / (B * heads, Q, Q), True = attention **blocked**.
        extras: group-specific data (e.g. DN metadata: ``dn_num_groups``, ``dn_pad_size``).
    """

    name: str
    content: Tensor
    reference: Tensor
    pos: Tensor | None = None
    self_attn_mask: Tensor | None = None
    extras: dict[str, object] = field(default_factory=dict)


@dataclass
class DecoderOutputs:
    """Per-layer predictions of one query group.

    Attributes:
        logits: (L, B, Q, num_classes) class logits (sigmoid / focal style).
        boxes: (L, B, Q, 4) normalised cxcywh predictions (after sigmoid).
        hidden: (L, B, Q, C) decoder states (after the output norm, if any).
        references: (L, B, Q, 4) the reference each layer refined from ((L, B, Q, 2) points for variants with
            2-D references throughout: Conditional-DETR, one-stage Deformable-DETR without refinement).
    """

    logits: Tensor
    boxes: Tensor
    hidden: Tensor
    references: Tensor


@dataclass
class PositiveCoords:
    """What one auxiliary head hands to the customized-positive-query builder (per image lists).

    Contains the head's *candidates*: positives (label < num_classes) and negatives (label ==
    num_classes), the latter used to pad the query group with random negatives.

    Attributes:
        tag: head kind, e.g. "atss", "rcnn".
        ref_boxes_xyxy: B tensors (N_b, 4) absolute xyxy, the anchors/proposals (queries' references).
        labels: B tensors (N_b,) int64, background = num_classes.
        target_boxes_xyxy: B tensors (N_b, 4) absolute xyxy assigned GT boxes (zeros for negatives).
        feats: B tensors (N_b, C) per-coordinate features (e.g. mean-pooled RoI features, or the
            pyramid cell feature of each anchor), or None.
    """

    tag: str
    ref_boxes_xyxy: list[Tensor]
    labels: list[Tensor]
    target_boxes_xyxy: list[Tensor]
    feats: list[Tensor] | None = None


@dataclass
class AuxTargets:
    """Fixed targets of one customized-positive-query group (no matching).

    Attributes:
        labels: (B, P) int64, background = num_classes.
        boxes: (B, P, 4) normalised cxcywh targets.
        label_weights: (B, P) float.
        box_weights: (B, P) float, 1 on positives.
        num_pos: python float, number of positives in this batch on this rank (before all-reduce).
    """

    labels: Tensor
    boxes: Tensor
    label_weights: Tensor
    box_weights: Tensor
    num_pos: float


@dataclass
class AuxHeadOutput:
    losses: dict[str, Tensor]
    positives: PositiveCoords


@dataclass
class MatchResult:
    """One-to-one assignment of one image: prediction ``pred_idx[i]`` is matched to GT ``gt_idx[i]``."""

    pred_idx: Tensor
    gt_idx: Tensor


@dataclass
class AssignResult:
    """One-to-many assignment of one image.

    Attributes:
        gt_index: (A,) int64 matched GT index per anchor; -1 = background, -2 = ignored.
        max_iou: (A,) float IoU with the matched (or best) GT.
        labels: (A,) int64 assigned class, background = num_classes.
    """

    gt_index: Tensor
    max_iou: Tensor
    labels: Tensor

    @property
    def pos_mask(self) -> Tensor:
        return self.gt_index >= 0

    @property
    def num_pos(self) -> int:
        return int(self.pos_mask.sum())


# --------------------------------------------------------------------------- interfaces
class OneToOneAssigner(ABC):
    """Set-prediction matching (Hungarian). Pure function of tensors; no module state."""

    kind: Literal["one_to_one"] = "one_to_one"

    @abstractmethod
    def match(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
              image_size_hw: Tensor) -> MatchResult:
        """Match Q predictions of one image to its N ground-truth objects.

        Args:
            logits: (Q, C) class logits.
            boxes: (Q, 4) normalised cxcywh.
            gt_labels: (N,) int64.
            gt_boxes: (N, 4) normalised cxcywh.
            image_size_hw: (2,) valid size, for costs computed in pixels.
        """

    def match_batch(self, logits: Tensor, boxes: Tensor, gt_labels: list[Tensor], gt_boxes: list[Tensor],
                    image_sizes: Tensor | None = None) -> list[MatchResult]:
        """Match B images (the criterion's call): (B, Q, C) logits, (B, Q, 4) boxes, B GT tensors, (B, 2)
        valid sizes or None. Default: :meth:`match` per image; matchers may batch the work (Hungarian does)."""
        return [self.match(logits[i], boxes[i], gt_labels[i], gt_boxes[i],
                           None if image_sizes is None else image_sizes[i]) for i in range(boxes.shape[0])]


class OneToManyAssigner(ABC):
    """Anchor/proposal -> GT assignment (ATSS, Max-IoU, SimOTA, ...). Pure function of tensors.

    Slots that call it (each takes any registered ``codetr.assigners`` component of this kind): the ATSS
    head (anchors, level-major ``num_per_level``, class labels), the Faster R-CNN RPN (anchors inside the
    image, level-major ``num_per_level``, class-agnostic: ``gt_labels`` all 0 and ``num_classes`` 1) and the
    Faster R-CNN RoI stage (proposals, ``num_per_level=None``, class labels).

    Attributes:
        uses_predictions: True for prediction-aware assigners (SimOTA-like). The ATSS head then passes
            ``pred_scores`` (A, num_classes) and ``pred_boxes_xyxy`` (A, 4) of its own detached outputs; the
            RPN passes its objectness (A, 1) and decoded boxes (A, 4). The RoI stage assigns before any RoI
            prediction exists and passes none (its candidates, the proposals, already are predicted boxes).
            Static assigners leave it False and receive None.
    """

    kind: Literal["one_to_many"] = "one_to_many"
    uses_predictions: ClassVar[bool] = False

    @abstractmethod
    def assign(self, anchors_xyxy: Tensor, num_per_level: list[int], gt_boxes_xyxy: Tensor,
               gt_labels: Tensor, num_classes: int, pred_scores: Tensor | None = None,
               pred_boxes_xyxy: Tensor | None = None, ignore_boxes_xyxy: Tensor | None = None
               ) -> AssignResult:
        """Assign A anchors (absolute xyxy, level-major order) to N GT boxes of one image.

        ``pred_scores`` (A, C) sigmoid scores and ``pred_boxes_xyxy`` (A, 4) are given for
        prediction-aware assigners (e.g. SimOTA); static assigners ignore them.
        """


Assigner = OneToOneAssigner | OneToManyAssigner


class AuxHead(nn.Module, ABC):
    """A one-to-many auxiliary head on the aux feature pyramid (training-time only by default).

    ``loss`` returns already-weighted losses (names without the head prefix; the detector prefixes
    ``aux{k}.``) and its :class:`PositiveCoords` for customized positive queries.
    """

    tag: str = "aux"

    @abstractmethod
    def loss(self, pyramid: FeaturePyramid, batch: Batch) -> AuxHeadOutput:
        """Forward + assignment + losses on a training batch (targets in ``batch.targets``)."""

    def predict(self, pyramid: FeaturePyramid, batch: Batch) -> list[Detections]:
        """Detections in the network-input frame (``eval_module`` analysis); optional."""
        raise NotImplementedError(f"{type(self).__name__} has no standalone inference")


class QueryEncoder(nn.Module, ABC):
    """Builds the customized positive query group ``k`` from an aux head's coordinates."""

    @abstractmethod
    def forward(self, coords: PositiveCoords, group: int, memory: Memory, pyramid: FeaturePyramid,
                batch: Batch, generator: torch.Generator | None = None) -> tuple[QueryGroup, AuxTargets]:
        """Select positives (+ random-negative padding), embed them, return queries + fixed targets."""


class CriterionOutput(Protocol):
    """What :meth:`Criterion.compute` returns (``codetr.heads.criterion.CriterionResult``).

    Attributes:
        losses: already-weighted loss terms (official key names, see :mod:`codetr.heads.criterion`).
        matches: the one-to-one matches behind them: ``"d{i}"`` per decoder layer, ``"enc"`` for the
            encoder proposals; B :class:`MatchResult` each.
    """

    losses: dict[str, Tensor]
    matches: dict[str, list[MatchResult]]


@runtime_checkable
class Criterion(Protocol):
    """The DETR-branch loss contract the detector, the variants and the Co-DETR branch rely on
    (implemented by ``codetr.heads.criterion.SetCriterion``; core never imports it).

    ``outputs`` are one query group's :class:`DecoderOutputs` ((L, B, Q, C) logits, (L, B, Q, 4) normalised
    cxcywh boxes). Every method returns already-weighted losses keyed ``[d{i}.]{prefix}loss_{cls,bbox,iou}
    {suffix}`` (no ``d{i}.`` for the last layer).
    """

    def compute(self, outputs: DecoderOutputs, batch: Batch, extras: Mapping[str, Tensor] | None = None
                ) -> CriterionOutput:
        """Per-layer Hungarian matching + losses of the "main" group; with an encoder loss configured also
        ``enc_loss_*`` on ``extras[EXTRAS_ENC_LOGITS]`` / ``extras[EXTRAS_ENC_BOXES]`` (``Memory.extras``)."""
        ...

    def __call__(self, outputs: DecoderOutputs, batch: Batch, extras: Mapping[str, Tensor] | None = None
                 ) -> dict[str, Tensor]:
        """``compute(outputs, batch, extras).losses``."""
        ...

    def fixed_target_loss(self, outputs: DecoderOutputs, targets: AuxTargets, *, prefix: str = "",
                          suffix: str = "", image_sizes: Tensor | None = None, weight: float = 1.0
                          ) -> dict[str, Tensor]:
        """Losses of a group with fixed targets (no matching) on every decoder layer, e.g. DINO's denoising
        part (``prefix="dn_"``); ``image_sizes`` (B, 2) valid (h, w) for the pixel GIoU; times ``weight``."""
        ...

    def aux_group_loss(self, outputs: DecoderOutputs, targets: AuxTargets, suffix: str,
                       image_sizes: Tensor | None = None, weight: float = 1.0) -> dict[str, Tensor]:
        """Co-DETR customized positive query group ``k`` (``suffix="_aux{k}"``): ``fixed_target_loss`` with
        that suffix, times ``weight`` (lambda_1)."""
        ...

    def repeated_target_loss(self, outputs: DecoderOutputs, batch: Batch, repeat: int, *, suffix: str,
                             weight: float = 1.0) -> dict[str, Tensor]:
        """One-to-many Hungarian losses on every decoder layer against each image's GT repeated ``repeat`` times
        (H-Deformable-DETR's hybrid branch, ``suffix="_one2many"``), times ``weight``; no encoder term."""
        ...


class DETRVariant(nn.Module, ABC):
    """A DETR variant as four hooks (mmdet-3 ``DetectionTransformer`` style).

    The detector calls ``prepare -> encode -> make_queries -> decode`` for the one-to-one branch and
    calls ``decode`` again, with the same weights, for every extra :class:`QueryGroup` (Co-DETR's
    customized positive queries), so a variant needs no Co-DETR specific code.
    """

    hidden_dim: int
    num_levels: int
    num_decoder_layers: int
    #: encoder tokens the variant needs at least (two-stage: its top-k proposal count); images so small that
    #: their feature maps hold fewer are padded with masked tokens by the detector
    min_tokens: int = 0

    @abstractmethod
    def prepare(self, levels: list[Tensor], masks: list[Tensor], strides: list[int]) -> EncoderInputs:
        """Flatten L maps (B, C, H_l, W_l) with padding masks (B, H_l, W_l) into encoder tokens."""

    @abstractmethod
    def encode(self, inputs: EncoderInputs) -> Memory:
        """Run the encoder (and two-stage proposal generation, if any)."""

    @abstractmethod
    def make_queries(self, memory: Memory, batch: Batch | None) -> list[QueryGroup]:
        """The one-to-one queries ("main"); during training also denoising groups ("dn").

        Queries that must see each other in self-attention are decoded *together*: a variant may return
        one group that carries several logical parts (e.g. DINO: the denoising queries in front of the
        matching queries, with the DN attention mask in ``self_attn_mask`` and the DN metadata in
        ``extras``) and split its outputs with :meth:`split_outputs`. The first group is always the one
        holding the "main" queries; with ``batch=None`` (inference) only "main" is returned.
        """

    @abstractmethod
    def decode(self, group: QueryGroup, memory: Memory) -> DecoderOutputs:
        """Decode one query group with the shared decoder and prediction heads."""

    def split_outputs(self, group: QueryGroup, outputs: DecoderOutputs) -> list[tuple[QueryGroup, DecoderOutputs]]:
        """Split the outputs of a jointly decoded group into its logical parts ``(part, outputs)``.

        The default is the group itself. DINO returns ``[(dn part, dn outputs), (main part, main outputs)]``
        for a group decoded with its denoising queries. The detector sends a part named "main" to the set
        criterion and any other part to :meth:`group_loss`.
        """
        return [(group, outputs)]

    def group_loss(self, group: QueryGroup, outputs: DecoderOutputs, batch: Batch, criterion: Criterion
                   ) -> dict[str, Tensor]:
        """Losses of an extra group (or group part, see :meth:`split_outputs`) this variant made in
        ``make_queries`` (e.g. DINO's denoising part "dn").

        The "main" part is handled by the detector's criterion; variants without extra groups never
        get here.
        """
        raise NotImplementedError(f"{type(self).__name__} made query group {group.name!r} but defines no loss for it")
