"""DINO (DINO-Deformable-DETR) with contrastive denoising, as a :class:`~codetr.core.interfaces.DETRVariant`.

It is the one-to-one branch of Co-DINO. Numerics follow MMDetection 3.x ``DINO`` and the MMDetection 3.x
Co-DETR port (``CoDINOHead`` / ``CoDinoTransformer``), see ``tests/variants/test_dino_parity.py`` and
``tests/integration/test_co_dino_parity.py``:

* **Encoder**: 4- or 5-scale deformable encoder (the layers of :mod:`codetr.variants.layers`, shared with
  Deformable-DETR); sine positional encoding with temperature 20 and offset 0 (mmdet DINO / Co-DINO) plus a
  learned level embedding.
* **Two-stage proposals** (mixed query selection): every encoder token gets a Deformable-DETR grid proposal,
  ``enc_output`` + ``enc_output_norm`` and the **class-specific** encoder head (index ``num_decoder_layers``)
  score and refine it; the top-``num_queries`` tokens by their **maximum class logit** give the (detached)
  4-D reference boxes. The content queries are the learned ``query_embedding`` (Q, C).
* **Decoder**: at every layer ``query_pos = ref_point_head(sine(ref * valid_ratio))`` (MLP 2C -> C -> C on
  the (y, x, w, h) sine embedding, temperature 10000; ``query_pos_frame: image`` drops the valid-ratio factor,
  making padded batches give the batch-size-1 result); iterative refinement
  ``new_ref = sigmoid(box_head_l(out_l) + inverse_sigmoid(ref_l, 1e-3))`` computed from the layer output
  **before** the shared ``decoder.norm`` and detached for the next layer; the heads predict from the
  **normed** output: ``box_l = sigmoid(box_head_l(norm(out_l)) + inverse_sigmoid(ref_l))`` where ``ref_l`` is
  the *undetached* refined reference of layer ``l - 1`` (look-forward-twice). Per-layer heads (not shared).
* **Contrastive denoising** (CDN, :class:`DenoisingGenerator`): ``num_groups = num_dn_queries // max #GT``
  (>= 1); each group has ``max #GT`` positive and ``max #GT`` negative queries. Labels are replaced by a
  random class with probability ``label_noise_scale / 2``; box corners move by ``rand * (w/2, h/2) *
  box_noise_scale`` with ``rand`` in (-1, 1) for positives and (-2, -1] u [1, 2) for negatives, clamped to
  [0, 1]. The DN queries are decoded **together with** the matching queries, in front of them, with the
  official attention mask (matching queries cannot see DN queries; DN groups cannot see each other), as one
  query group "main" whose ``extras`` carry the DN metadata; :meth:`DINO.split_outputs` splits the outputs
  into the "dn" and "main" parts, and :meth:`DINO.group_loss` computes the DN losses with
  ``SetCriterion.fixed_target_loss(prefix="dn_")`` (positives: the GT; negatives and padding: background).
  With no GT in the whole batch there are no DN queries (the ``dn_loss_*`` terms are zero, official).

Extra query groups (Co-DINO's customized positive queries) are decoded by :meth:`DINO.decode` with
``pos=None`` (positions derive from the reference at every layer), no DN and no self-attention mask, over the
same encoder memory (= the adapter pyramid without its extra level, as official ``forward_aux``).

State-dict layout (prefix ``variant.`` in a detector)::

    level_embed                                             (L, C)
    encoder.layers.{i}.*                                    as Deformable-DETR
    decoder.layers.{i}.*                                    as Deformable-DETR
    decoder.ref_point_head.layers.{0,1}.*                   Linear(2C, C), Linear(C, C)
    decoder.norm.*                                          LayerNorm(C), shared by all layers
    class_heads.{k}.*, box_heads.{k}.layers.{0,1,2}.*       k < num_decoder_layers: decoder layer k;
                                                            k = num_decoder_layers: encoder proposals
    enc_output.*, enc_output_norm.*                         two-stage memory projection
    query_embedding.weight                                  (Q, C) content queries
    denoising.label_embedding.weight                        (num_classes, C), only with ``with_dn``

``Memory.extras`` (set by :meth:`DINO.encode`, keys = the ``EXTRAS_*`` constants of
:mod:`codetr.core.interfaces`, the same meaning as in Deformable-DETR): ``enc_logits`` (B, k, C) /
``enc_boxes`` (B, k, 4) the proposals the encoder loss trains, for DINO the selected top-k (what
``SetCriterion(enc_loss="class")`` trains), ``topk_indices`` (B, k), ``topk_boxes_unact`` (B, k, 4) detached
(the initial references), ``enc_logits_all`` (B, S, C), ``enc_boxes_unact_all`` (B, S, 4), ``enc_proposals_unact``
(B, S, 4) (+inf where invalid), ``enc_valid`` (B, S). Encoder, ``prepare`` / ``encode`` and the proposal
generation are the shared :class:`~codetr.variants.base.DeformableVariant`; this module adds the DINO decoder
(``ref_point_head``, ``decoder.norm``, look-forward-twice), the content queries and contrastive denoising.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from codetr.core.interfaces import (EXTRAS_TOPK_BOXES_UNACT, AuxTargets, Criterion, DecoderOutputs, Memory,
                                    QueryGroup)
from codetr.core.registry import Component, ComponentConfig
from codetr.core.structures import Batch, xyxy_to_cxcywh
from codetr.ops.functional import inverse_sigmoid
from codetr.ops.position import sine_box_embedding
from codetr.variants.base import DeformableVariant, with_shared_fallbacks
from codetr.variants.layers import MLP, DeformableDecoderLayer, init_prediction_heads, slice_outputs

__all__ = ["DINOConfig", "DINO", "DenoisingGenerator", "DenoisingQueries", "dn_attention_mask",
           "dn_num_groups", "build", "COMPONENT"]

#: Fallbacks for shared fields when a config is built outside a recipe (unit tests, notebooks): DINO-4scale.
_SHARED_FALLBACKS = {"hidden_dim": 256, "num_levels": 4, "num_decoder_layers": 6, "num_queries": 900}

#: ``inverse_sigmoid`` eps of the decoder's reference refinement and of the DN box queries (official DINO).
REFINE_EPS = 1e-3


class DINOConfig(ComponentConfig):
    """DINO / Co-DINO one-to-one branch (defaults: MMDetection Co-DINO / DINO R50 configs).

    Shared fields (``hidden_dim``, ``num_queries``, ``num_levels``, ``num_classes``, ``num_decoder_layers``) are
    injected by the recipe (Co-DINO: 5 levels, 900 queries; DINO-4scale: 4 levels, 900 queries).
    """

    type: Literal["dino"] = "dino"

    hidden_dim: int | None = None
    num_queries: int | None = None
    num_levels: int | None = None
    num_classes: int | None = None
    num_decoder_layers: int | None = None

    num_encoder_layers: int = Field(6, ge=1)
    num_heads: int = Field(8, ge=1)
    num_points: int = Field(4, ge=1)
    ffn_dim: int = Field(2048, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    pe_temperature: float = Field(20.0, gt=0, description="image sine PE temperature (mmdet DINO / Co-DINO: 20)")
    pe_offset: float = Field(0.0, description="image sine PE offset (DINO: 0; Deformable-DETR: -0.5)")

    # ---- contrastive denoising
    with_dn: bool = True
    num_dn_queries: int = Field(100, ge=1, description="dynamic groups = num_dn_queries // max #GT in the batch")
    label_noise_scale: float = Field(0.5, ge=0, le=2, description="a label is re-drawn with probability scale/2")
    box_noise_scale: float = Field(1.0, ge=0, description="corner jitter in units of half the box size")

    # ---- numerics / selection
    #: ``inverse_sigmoid`` eps applied to the reference when the heads predict boxes: 1e-3 in Co-DINO (and the
    #: original DINO); MMDetection 3.x ``DINOHead`` uses its default 1e-5. Only boxes within eps of 0 / 1 differ.
    pred_ref_eps: float = Field(1e-3, gt=0, lt=0.5)
    #: Rank invalid proposals (padding, or outside (0.01, 0.99)) last in the top-k. The official code ranks them
    #: by their bias-only logit and would then use a +inf box; equal to it whenever it selects none.
    two_stage_mask_invalid: bool = True
    #: Activation checkpointing of the first N encoder layers (official ``with_cp``; Co-DINO uses 4-6).
    encoder_checkpoint_layers: int = Field(0, ge=0)
    prior_prob: float = Field(0.01, gt=0, lt=1)
    #: Frame of the reference box whose sine embedding gives the positional queries. "canvas" (official): the
    #: box times the level-0 valid ratio, i.e. relative to the padded batch canvas, so an image's detections
    #: depend on how much padding its batch adds. "image": relative to the image itself, which makes every
    #: batch give the batch-size-1 result (of a model trained either way; at batch size 1 both are identical).
    query_pos_frame: Literal["canvas", "image"] = "canvas"


# ---------------------------------------------------------------------- contrastive denoising
def dn_num_groups(num_dn_queries: int, max_num_gt: int) -> int:
    """Dynamic number of denoising groups: ``num_dn_queries // max #GT``, at least 1 (1 when there is no GT)."""
    if max_num_gt <= 0:
        return 1
    return max(1, int(num_dn_queries) // int(max_num_gt))


def dn_attention_mask(num_dn: int, group_size: int, num_matching: int, device: torch.device | None = None
                      ) -> Tensor:
    """(num_dn + num_matching)^2 bool self-attention mask, True = blocked (official CDN mask).

    Queries are ``[DN group 0 | DN group 1 | ... | matching queries]``, each DN group ``group_size`` long
    (2 x max #GT). Matching queries cannot see any DN query; a DN query sees its own group and the matching
    queries, not the other groups.
    """
    n = num_dn + num_matching
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    if num_dn:
        group = torch.arange(num_dn, device=device) // group_size
        mask[:num_dn, :num_dn] = group[:, None] != group[None, :]
    return mask


@dataclass
class DenoisingQueries:
    """Denoising queries of one batch (layout per image: ``G`` groups of ``[pad positives | pad negatives]``,
    ``pad`` = max #GT in the batch; slots beyond an image's own GT are zero padding).

    Attributes:
        content: (B, P, C) label embeddings of the noisy labels (zeros on padding), P = 2 * pad * G.
        boxes_unact: (B, P, 4) inverse-sigmoid (eps 1e-3) of the noisy normalised cxcywh boxes (0 on padding).
        num_groups: G.
        group_size: 2 * pad.
        targets: fixed targets of the P queries (positives: the GT; negatives / padding: background, label
            weight 1, box weight 0; ``num_pos`` = #GT x G).
        noisy_labels: (2G * N,) the noisy labels in the official flat layout (block ``i`` of N = all GT of the
            batch concatenated; even blocks positive, odd blocks negative).
    """

    content: Tensor
    boxes_unact: Tensor
    num_groups: int
    group_size: int
    targets: AuxTargets
    noisy_labels: Tensor

    @property
    def num_queries(self) -> int:
        return int(self.content.shape[1])


class DenoisingGenerator(nn.Module):
    """Contrastive denoising (CDN) query generator with official semantics (MMDetection ``CdnQueryGenerator``).

    Random numbers come from the global torch RNG in the official order (label flip draws, class draws, sign
    draws, magnitude draws), so a seeded run reproduces the official noise. A scale of exactly 0 draws nothing.
    :meth:`injected_noise` replaces the drawn noise with given values (e.g. the noise stored by an official run).
    """

    def __init__(self, num_classes: int, hidden_dim: int, num_dn_queries: int = 100, label_noise_scale: float = 0.5,
                 box_noise_scale: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_dn_queries = num_dn_queries
        self.label_noise_scale = label_noise_scale
        self.box_noise_scale = box_noise_scale
        self.label_embedding = nn.Embedding(num_classes, hidden_dim)
        self._injected: tuple[Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        return (f"num_dn_queries={self.num_dn_queries}, label_noise_scale={self.label_noise_scale}, "
                f"box_noise_scale={self.box_noise_scale}")

    @contextlib.contextmanager
    def injected_noise(self, noisy_labels: Tensor, boxes_unact: Tensor) -> Iterator[None]:
        """Use these noisy labels (M,) and box queries (M, 4) (official flat layout, see
        :attr:`DenoisingQueries.noisy_labels`; for one image also the collated layout) instead of drawing."""
        prev = self._injected
        self._injected = (noisy_labels, boxes_unact)
        try:
            yield
        finally:
            self._injected = prev

    def noisy_queries(self, labels: Tensor, boxes_xyxy: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
        """Noise the N GT of the batch into ``2 * num_groups`` blocks (flat layout).

        Args:
            labels: (N,) int64 GT labels of all images concatenated.
            boxes_xyxy: (N, 4) their boxes, normalised xyxy.

        Returns:
            ``(noisy_labels (2G*N,), boxes_unact (2G*N, 4))``: block ``2g`` are the positives and ``2g+1`` the
            negatives of group ``g``; boxes are ``inverse_sigmoid(cxcywh(noisy xyxy), eps=1e-3)``.
        """
        n = labels.shape[0]
        m = 2 * num_groups * n
        if self._injected is not None:
            noisy_labels, unact = self._injected
            noisy_labels = noisy_labels.reshape(-1).to(labels.device, torch.int64)
            unact = unact.reshape(-1, 4).to(boxes_xyxy.device, boxes_xyxy.dtype)
            if noisy_labels.shape[0] != m or unact.shape[0] != m:
                raise ValueError(f"injected DN noise has {noisy_labels.shape[0]} labels / {unact.shape[0]} boxes, "
                                 f"this batch needs {m} (2 x {num_groups} groups x {n} GT)")
            return noisy_labels, unact
        labels_rep = labels.repeat(2 * num_groups)
        boxes_rep = boxes_xyxy.repeat(2 * num_groups, 1)
        if self.label_noise_scale > 0:
            flip = torch.rand_like(labels_rep.float()) < self.label_noise_scale * 0.5
            idx = flip.nonzero().view(-1)
            new = torch.randint_like(idx, 0, self.num_classes)
            labels_rep = labels_rep.scatter(0, idx, new)
        if self.box_noise_scale > 0:
            sign = torch.randint_like(boxes_rep, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
            magnitude = torch.rand_like(boxes_rep)
            negative = (torch.arange(m, device=boxes_rep.device) // max(n, 1)) % 2 == 1
            magnitude[negative] += 1.0
            magnitude *= sign
            half_wh = xyxy_to_cxcywh(boxes_rep)[:, 2:].repeat(1, 2)
            boxes_rep = (boxes_rep + torch.mul(magnitude, half_wh) * self.box_noise_scale / 2).clamp(min=0.0, max=1.0)
        return labels_rep, inverse_sigmoid(xyxy_to_cxcywh(boxes_rep), eps=REFINE_EPS)

    def forward(self, gt_labels: list[Tensor], gt_boxes_xyxy: list[Tensor]) -> DenoisingQueries:
        """DN queries and targets for B images: ``gt_labels[b]`` (N_b,), ``gt_boxes_xyxy[b]`` (N_b, 4) normalised
        xyxy (relative to each image's valid size)."""
        weight = self.label_embedding.weight
        device = weight.device
        bsz = len(gt_labels)
        counts = [int(x.shape[0]) for x in gt_labels]
        pad = max(counts, default=0)
        groups = dn_num_groups(self.num_dn_queries, pad)
        num_dn = 2 * pad * groups
        labels = torch.cat([x.to(device).long() for x in gt_labels]) if bsz else torch.zeros(0, dtype=torch.long,
                                                                                               device=device)
        boxes = (torch.cat([x.to(device).float() for x in gt_boxes_xyxy]) if bsz
                 else torch.zeros(0, 4, device=device))
        content = weight.new_zeros(bsz, num_dn, self.hidden_dim)
        unact = boxes.new_zeros(bsz, num_dn, 4)
        noisy_labels = labels.new_zeros(0)
        if num_dn:
            noisy_labels, noisy_unact = self.noisy_queries(labels, boxes, groups)
            batch_idx = torch.cat([torch.full((c,), b, dtype=torch.long, device=device) for b, c in enumerate(counts)])
            local_idx = torch.cat([torch.arange(c, device=device) for c in counts])
            blocks = torch.arange(2 * groups, device=device).repeat_interleave(labels.shape[0])
            slot = local_idx.repeat(2 * groups) + pad * blocks
            rows = batch_idx.repeat(2 * groups)
            content = content.index_put((rows, slot), self.label_embedding(noisy_labels))
            unact = unact.index_put((rows, slot), noisy_unact)
        targets = self.targets(gt_labels, gt_boxes_xyxy, pad, groups, device)
        return DenoisingQueries(content=content, boxes_unact=unact, num_groups=groups, group_size=2 * pad,
                                targets=targets, noisy_labels=noisy_labels)

    def targets(self, gt_labels: list[Tensor], gt_boxes_xyxy: list[Tensor], pad: int, groups: int,
                device: torch.device) -> AuxTargets:
        """Fixed DN targets (MMDetection ``DINOHead.get_dn_targets``): per group, slot ``j < N_b`` of the positive
        half is GT ``j``; everything else is background with label weight 1 and box weight 0."""
        bsz = len(gt_labels)
        num_dn = 2 * pad * groups
        labels = torch.full((bsz, num_dn), self.num_classes, dtype=torch.long, device=device)
        boxes = torch.zeros(bsz, num_dn, 4, device=device)
        box_w = torch.zeros(bsz, num_dn, device=device)
        num_pos = 0
        for b, (lab, box) in enumerate(zip(gt_labels, gt_boxes_xyxy)):
            n = int(lab.shape[0])
            if n == 0:
                continue
            idx = (torch.arange(groups, device=device)[:, None] * 2 * pad + torch.arange(n, device=device)).flatten()
            labels[b, idx] = lab.to(device).long().repeat(groups)
            boxes[b, idx] = xyxy_to_cxcywh(box.to(device).float()).repeat(groups, 1)
            box_w[b, idx] = 1.0
            num_pos += n * groups
        return AuxTargets(labels=labels, boxes=boxes, label_weights=torch.ones(bsz, num_dn, device=device),
                          box_weights=box_w, num_pos=float(num_pos))


# ---------------------------------------------------------------------- decoder container
class DINODecoder(nn.Module):
    """The decoder layers plus the per-layer positional-query MLP and the shared output LayerNorm."""

    def __init__(self, layers, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.norm = nn.LayerNorm(dim)


# ---------------------------------------------------------------------- the variant
class DINO(DeformableVariant):
    """DINO / Co-DINO one-to-one branch; see the module docstring. Build with :func:`build`.

    The encoder side, ``prepare`` / ``encode`` and the two-stage proposals come from
    :class:`~codetr.variants.base.DeformableVariant` (always two-stage; proposals ranked by the maximum
    class logit, the encoder loss trains the selected top-k).
    """

    two_stage = True
    proposal_score = "max"
    proposal_loss_on = "topk"

    def __init__(self, cfg: DINOConfig) -> None:
        super().__init__()
        c = self._setup(cfg)
        layer_args = self._build_encoder(cfg)
        self.decoder = DINODecoder((DeformableDecoderLayer(*layer_args) for _ in range(self.num_decoder_layers)), c)
        self._build_heads(self.num_decoder_layers + 1)
        self._build_enc_output()
        self.query_embedding = nn.Embedding(self.num_queries, c)
        self.denoising = (DenoisingGenerator(self.num_classes, c, cfg.num_dn_queries, cfg.label_noise_scale,
                                             cfg.box_noise_scale) if cfg.with_dn else None)
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Official initialisation (mmdet ``DINO.init_weights`` + ``DINOHead.init_weights``; Co-DINO)."""
        self._init_encoder_weights()
        nn.init.normal_(self.query_embedding.weight)  # Co-DINO / original DINO (nn.Embedding default)
        # two-stage: no (w, h) bias on the box heads, the reference carries a size
        init_prediction_heads(self.class_heads, self.box_heads, self.cfg.prior_prob)

    # ------------------------------------------------------------------ queries
    def make_queries(self, memory: Memory, batch: Batch | None = None) -> list[QueryGroup]:
        """The matching queries ("main"); with a batch and ``with_dn`` the DN queries are put in front of them
        in the same group, with the CDN self-attention mask (see :meth:`split_outputs`)."""
        unact = memory.extras[EXTRAS_TOPK_BOXES_UNACT]
        b, k = unact.shape[:2]
        content = self.query_embedding.weight[:k].unsqueeze(0).expand(b, -1, -1)
        reference = unact.sigmoid()
        if batch is None or self.denoising is None:
            return [QueryGroup(name="main", content=content, reference=reference)]
        labels, boxes = _normalised_targets(batch, unact.device)
        dn = self.denoising(labels, boxes)
        n = dn.num_queries
        mask = dn_attention_mask(n, dn.group_size, k, device=unact.device) if n else None
        extras = {"dn_num_queries": n, "dn_num_groups": dn.num_groups, "dn_group_size": dn.group_size,
                  "dn_targets": dn.targets, "dn_noisy_labels": dn.noisy_labels}
        return [QueryGroup(name="main", content=torch.cat([dn.content.to(content.dtype), content], 1),
                           reference=torch.cat([dn.boxes_unact.sigmoid().to(reference.dtype), reference], 1),
                           self_attn_mask=mask, extras=extras)]

    def split_outputs(self, group: QueryGroup, outputs: DecoderOutputs) -> list[tuple[QueryGroup, DecoderOutputs]]:
        """``[("dn", ...), ("main", ...)]`` for a group decoded with DN queries, else the group itself."""
        n = group.extras.get("dn_num_queries")
        if n is None:
            return [(group, outputs)]
        n = int(n)

        dn = QueryGroup(name="dn", content=group.content[:, :n], reference=group.reference[:, :n],
                        self_attn_mask=None if group.self_attn_mask is None else group.self_attn_mask[:n, :n],
                        extras=dict(group.extras))
        main = QueryGroup(name=group.name, content=group.content[:, n:], reference=group.reference[:, n:])
        return [(dn, slice_outputs(outputs, None, n)), (main, slice_outputs(outputs, n, None))]

    def group_loss(self, group: QueryGroup, outputs: DecoderOutputs, batch: Batch, criterion: Criterion
                   ) -> dict[str, Tensor]:
        """Denoising losses ``[d{i}.]dn_loss_{cls,bbox,iou}`` (fixed targets, every decoder layer)."""
        if group.name != "dn":
            return super().group_loss(group, outputs, batch, criterion)
        losses = criterion.fixed_target_loss(outputs, group.extras["dn_targets"], prefix="dn_",
                                             image_sizes=batch.image_sizes.to(outputs.logits.device))
        if outputs.logits.shape[2] == 0 and self.denoising is not None and losses:
            # no GT in the batch: keep the label embedding in the graph (DDP), as the official code does
            first = next(iter(losses))
            losses[first] = losses[first] + self.denoising.label_embedding.weight[0, 0] * 0.0
        return losses

    # ------------------------------------------------------------------ decode
    def decode(self, group: QueryGroup, memory: Memory) -> DecoderOutputs:
        if group.pos is not None:
            raise ValueError(f"query group {group.name!r} has explicit positional queries; DINO derives them from "
                             "the reference box at every layer (use the query encoder's 'dino' flavour, pos=None)")
        if group.reference.shape[-1] != 4:
            raise ValueError(f"DINO needs 4-D reference boxes (cx, cy, w, h), got {group.reference.shape[-1]}-D")
        inputs = memory.inputs
        vr = inputs.valid_ratios
        scale = torch.cat([vr, vr], -1)[:, None]  # (B, 1, L, 4)
        x = group.content
        ref = group.reference
        ref_pred = ref  # look-forward-twice: the undetached refined reference of the previous layer
        eps = self.cfg.pred_ref_eps
        canvas = self.cfg.query_pos_frame == "canvas"
        logits, boxes, hidden, refs = [], [], [], []
        for lid, layer in enumerate(self.decoder.layers):
            ref_in = ref[:, :, None] * scale
            sine = sine_box_embedding(ref_in[:, :, 0] if canvas else ref, num_feats=self.hidden_dim // 2,
                                      temperature=10000, scale=2 * math.pi, order="yxwh")
            pos = self.decoder.ref_point_head(sine.to(x.dtype))
            x = layer(x, pos, ref_in, memory.memory, inputs.spatial_shapes, inputs.padding_mask, group.self_attn_mask)
            h = self.decoder.norm(x)
            logits.append(self.class_heads[lid](h))
            boxes.append((self.box_heads[lid](h) + inverse_sigmoid(ref_pred, eps=eps)).sigmoid())
            hidden.append(h)
            refs.append(ref_pred)
            new_ref = (self.box_heads[lid](x) + inverse_sigmoid(ref, eps=REFINE_EPS)).sigmoid()
            ref_pred, ref = new_ref, new_ref.detach()
        return DecoderOutputs(logits=torch.stack(logits), boxes=torch.stack(boxes), hidden=torch.stack(hidden),
                              references=torch.stack(refs))


def _normalised_targets(batch: Batch, device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """Non-crowd GT per image: labels (N_b,) and boxes as xyxy divided by the valid (w, h, w, h) (official
    order: normalise, then convert)."""
    labels, boxes = [], []
    for b, t in enumerate(batch.targets):
        t = t.non_crowd()
        h, w = batch.image_sizes[b].tolist()
        factor = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        labels.append(t.labels.to(device).long())
        boxes.append(t.boxes.to(device).float() / factor)
    return labels, boxes


def build(cfg: DINOConfig) -> DINO:
    """Build the variant; shared fields left unset fall back to DINO-4scale defaults (num_classes is required)."""
    return DINO(with_shared_fallbacks(cfg, _SHARED_FALLBACKS))


COMPONENT = Component(config=DINOConfig, build=build,
                      summary="DINO (two-stage mixed query selection, look-forward-twice, contrastive denoising)")
