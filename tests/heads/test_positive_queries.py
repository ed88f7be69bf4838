"""Customized positive query construction (official get_aux_targets): counts, padding, shapes, embedding."""

from __future__ import annotations

import torch

from codetr.core.interfaces import PositiveCoords
from codetr.heads.positive_queries import PositiveQueriesConfig, PositiveQueryEncoder, select_positive_queries

C = 5  # num_classes; background = 5


def coords(num_pos: list[int], num_neg: list[int], feats: bool = True) -> PositiveCoords:
    refs, labels, tgts, fts = [], [], [], []
    for p, n in zip(num_pos, num_neg):
        k = p + n
        xy = (torch.arange(k, dtype=torch.float32)[:, None] * 2).repeat(1, 2)
        refs.append(torch.cat([xy, xy + 10], 1))
        labels.append(torch.cat([torch.arange(p) % C, torch.full((n,), C)]))
        tgts.append(torch.cat([torch.cat([xy[:p] + 1, xy[:p] + 12], 1), torch.zeros(n, 4)]))
        fts.append(torch.randn(k, 8))
    return PositiveCoords("atss", refs, labels, tgts, fts if feats else None)


SIZES = torch.tensor([[100, 200], [100, 200]])


def test_group_size_is_max_positives_clamped():
    sel = select_positive_queries(coords([12, 3], [50, 50]), SIZES, C)
    assert sel.reference.shape == (2, 12, 4) and sel.feats.shape == (2, 12, 8)
    assert sel.targets.num_pos == 15
    # image 1: 3 positives first, then 9 random negatives (background label, label weight 1, box weight 0)
    assert (sel.targets.labels[1, :3] < C).all() and (sel.targets.labels[1, 3:] == C).all()
    assert sel.targets.box_weights[1].tolist() == [1.0] * 3 + [0.0] * 9
    assert (sel.targets.label_weights == 1).all()
    # at least min_pos (9) queries even without positives
    sel = select_positive_queries(coords([0, 2], [30, 30]), SIZES, C)
    assert sel.reference.shape[1] == 9 and sel.targets.num_pos == 2


def test_positives_beyond_max_are_subsampled():
    g = torch.Generator().manual_seed(0)
    sel = select_positive_queries(coords([40, 5], [10, 10]), SIZES, C, min_pos=9, max_pos=20, generator=g)
    assert sel.reference.shape[1] == 20
    assert (sel.targets.labels[0] < C).all() and sel.targets.num_pos == 25


def test_boxes_are_normalised_cxcywh_of_the_valid_image():
    sel = select_positive_queries(coords([1], [20]), SIZES[:1], C)
    # first positive: ref (0, 0, 10, 10) in a 200 x 100 (w x h) image
    torch.testing.assert_close(sel.reference[0, 0], torch.tensor([5 / 200, 5 / 100, 10 / 200, 10 / 100]))
    torch.testing.assert_close(sel.targets.boxes[0, 0], torch.tensor([6.5 / 200, 6.5 / 100, 11 / 200, 11 / 100]))


def test_too_few_negatives_pad_with_weightless_rows():
    sel = select_positive_queries(coords([9, 1], [0, 2]), SIZES, C)
    assert sel.reference.shape[1] == 9
    assert sel.targets.label_weights[1].tolist() == [1.0] * 3 + [0.0] * 6
    assert (sel.reference[1, 3:] == 0).all() and (sel.targets.labels[1, 3:] == C).all()


def test_encoder_flavours_and_gradients():
    for flavour, head_pos in (("deformable", "scalar"), ("deformable", "vector"), ("dino", "none")):
        cfg = PositiveQueriesConfig(hidden_dim=16, num_classes=C, flavour=flavour, head_pos_embed=head_pos,
                                    with_coord_feat=flavour == "deformable")
        enc = PositiveQueryEncoder(cfg, num_groups=2)
        sel = select_positive_queries(coords([4, 2], [20, 20], feats=True), SIZES, C)
        content, pos = enc.embed(sel.reference, torch.randn(2, 9, 16), group=1)
        assert content.shape == (2, 9, 16)
        assert (pos is None) == (flavour == "dino")
        (content.sum() + (0 if pos is None else pos.sum())).backward()
        used = [n for n, p in enc.named_parameters() if p.grad is not None]
        assert any(".1." in n or n == "head_pos_embed" for n in used)
