"""collate: padding, masks, sizes."""

from __future__ import annotations

import pytest
import torch

from codetr.core.structures import Target
from codetr.data.collate import PADDING_IMAGE_ID, Sample, collate


def _s(h, w, iid, fill=1.0):
    return Sample(torch.full((3, h, w), fill), Target.empty(), iid, (h * 2, w * 2))


def test_pads_bottom_right_and_builds_masks():
    b = collate([_s(4, 6, 1), _s(5, 3, 2, fill=2.0)])
    assert tuple(b.images.shape) == (2, 3, 5, 6) and b.images.dtype == torch.float32
    assert b.image_sizes.tolist() == [[4, 6], [5, 3]] and b.image_sizes.dtype == torch.int64
    assert b.orig_sizes.tolist() == [[8, 12], [10, 6]]
    assert b.image_ids == [1, 2]
    assert (b.images[0, :, :4, :6] == 1).all() and (b.images[0, :, 4:, :] == 0).all()
    assert (b.images[1, :, :, 3:] == 0).all()
    assert not b.masks[0, :4, :6].any() and b.masks[0, 4, :].all()
    assert not b.masks[1, :5, :3].any() and b.masks[1, :, 3:].all()
    assert b.masks.dtype == torch.bool and len(b.targets) == 2


def test_size_divisor_and_fixed_canvas():
    b = collate([_s(4, 6, 1)], size_divisor=8)
    assert tuple(b.images.shape[-2:]) == (8, 8) and b.masks[0, 4:, :].all() and b.masks[0, :, 6:].all()
    b = collate([_s(4, 6, 1)], pad_to=(10, 12), size_divisor=8)
    assert tuple(b.images.shape[-2:]) == (16, 16)
    with pytest.raises(ValueError, match="larger than the fixed canvas"):
        collate([_s(11, 6, 1)], pad_to=(10, 12))


def test_errors_and_padding_flag():
    with pytest.raises(ValueError, match="at least one"):
        collate([])
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        collate([Sample(torch.zeros(1, 2, 2), Target.empty(), 1, (2, 2))])
    s = _s(2, 2, 5).as_padding()
    assert s.is_padding and s.image_id == PADDING_IMAGE_ID and not _s(2, 2, 0).is_padding
