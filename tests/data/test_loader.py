"""Loaders: DDP semantics (simulated ranks x workers), exact lengths, corrupt data, resume, configs."""

from __future__ import annotations

import io
import math
import tarfile
import warnings

import pytest
import torch
from pydantic import ValidationError

from codetr.data.coco_folder import CocoFolderDataset, CocoFolderLoader
from codetr.data.convert import convert_coco, plan_shard_sizes
from codetr.data.format import DataError, load_index
from codetr.data.loader import DataSourceConfig, build_loader, source_categories
from codetr.data.loader_base import LoaderOptions
from codetr.data.shards import plan_epoch, resolve_rank_world, resolve_shards
from codetr.data.stream import ShardLoader
from codetr.data.transforms import build_transforms

pytestmark = pytest.mark.filterwarnings("ignore:codetr.data. shard skew:RuntimeWarning")

NONE = {"kind": "none"}
SMALL_DETR = {"kind": "detr", "scales": [96, 128], "max_size": 200, "crop_resize_scales": [80, 100],
              "crop_size": [60, 90], "eval_size": 128}


def _loader(src, train, *, transforms=NONE, shuffle_buffer=1000, num_samples=None, **kw):
    """A ShardLoader; ``kw`` are LoaderOptions fields (batch_size 3, rank 0 of 1 unless given)."""
    kw.setdefault("batch_size", 3)
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    return ShardLoader(src, LoaderOptions(train=train, **kw), transform=build_transforms(transforms, train),
                       shuffle_buffer=shuffle_buffer, num_samples=num_samples)


def _shard_of_id(shard_dir):
    """image id -> shard index (the synthetic ids are 1..N in file order, shards are consecutive)."""
    index, _ = load_index(shard_dir)
    out, start = {}, 0
    for k, n in enumerate(index.shard_sizes):
        for i in range(start, start + n):
            out[i + 1] = k
        start += n
    return out


# ---------------------------------------------------------------------------------------------
# evaluation: exactly once, equal batch counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [4, 13])  # 7 shards (2 workers own shards) / 2 shards (sample split)
def test_eval_two_ranks_two_workers_exactly_once(synth_set, synth_json, shard_dir, tmp_path, shard_size):
    src = shard_dir
    if shard_size != 4:
        src = tmp_path / "few"
        convert_coco(synth_set.ann_file, synth_set.images_dir, src, shard_size=shard_size, num_workers=0,
                     progress=False, verbose=False)
    seen, counts, lengths = [], [], []
    for rank in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "few shards" note
            loader = _loader(src, False, num_workers=2, rank=rank, world_size=2)
        batches = list(loader)
        lengths.append(len(loader))
        counts.append(len(batches))
        ids = [i for b in batches for i in b.image_ids]
        assert all(b.images.shape[0] <= 3 for b in batches)
        seen.append([i for i in ids if i >= 0])
        assert all(i == -1 for i in ids if i < 0)
    assert counts[0] == counts[1] == lengths[0] == lengths[1]
    assert not set(seen[0]) & set(seen[1])
    everything = sorted(seen[0] + seen[1])
    assert everything == sorted(im["id"] for im in synth_json["images"])  # each image exactly once


def test_eval_pads_short_rank_with_flagged_samples(shard_dir):
    # 7 shards of [4,4,4,4,4,3,3]: rank 0 reads 15 samples, rank 1 reads 11 -> rank 1 gets padding
    loaders = [_loader(shard_dir, False, num_workers=2, rank=r, world_size=2) for r in range(2)]
    plans = [ld.plan() for ld in loaders]
    assert plans[0].rank_samples == (15, 11)
    batches = list(loaders[1])
    padded = [b for b in batches if any(i < 0 for i in b.image_ids)]
    assert len(padded) == 1 and padded[0].image_ids == [-1] and len(batches) == len(loaders[0])


def test_eval_fails_clearly_when_a_rank_has_no_shard(shard_dir):
    with pytest.raises(DataError, match="7 shard.* cannot be split over 8 ranks"):
        _loader(shard_dir, False, rank=0, world_size=8)


# ---------------------------------------------------------------------------------------------
# training: exact and equal lengths, shard order per epoch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_train_ranks_yield_equal_exact_batch_counts(shard_dir, synth_json, world):
    valid = {im["id"] for im in synth_json["images"]}
    expected = math.ceil(len(valid) / (4 * world))
    for rank in range(world):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            loader = _loader(shard_dir, True, batch_size=4, num_workers=2, rank=rank, world_size=world,
                             shuffle_buffer=5, transforms=SMALL_DETR)
        if world == 3:  # 7 shards over 3 ranks: unequal sample counts are reported
            assert any("shard skew" in str(w.message) for w in rec)
        batches = list(loader)
        assert len(loader) == len(batches) == expected
        assert all(len(b) == 4 and set(b.image_ids) <= valid for b in batches)
        assert loader.epoch == 1  # a completed epoch advances the counter


def test_shard_order_shared_by_ranks_and_reshuffled_per_epoch(shard_dir):
    sizes = plan_shard_sizes(26, 4)
    kw = dict(num_workers=2, batch_size=4, train=True, seed=5)
    p = {(r, e): plan_epoch(sizes, 7, 26, rank=r, world_size=2, epoch=e, **kw) for r in range(2) for e in range(4)}
    for e in range(4):
        assert p[0, e].shard_order == p[1, e].shard_order
        mine = [set(s for w in p[r, e].workers for s in w.shards) for r in range(2)]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(7))
    assert len({p[0, e].shard_order for e in range(4)}) == 4
    assert all(p[0, e].num_batches == p[1, e].num_batches == 4 for e in range(4))

    # the data actually streamed by rank 0 comes from the planned shards, which change per epoch
    loader = _loader(shard_dir, True, batch_size=4, num_workers=0, rank=0, world_size=2, seed=5, shuffle_buffer=0)
    shard_of = _shard_of_id(shard_dir)
    used = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        planned = {s for w in loader.plan().workers for s in w.shards}
        got = {shard_of[i] for b in loader for i in b.image_ids}
        assert got <= planned
        used.append(planned)
    assert used[0] != used[1]


def test_rank_is_resolved_once_in_the_main_process(shard_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_rank_world() == (1, 2)
    assert resolve_rank_world(0, 4) == (0, 4)
    loader = ShardLoader(shard_dir, LoaderOptions(train=False, batch_size=4))
    monkeypatch.setenv("RANK", "0")  # later changes (e.g. in workers) do not matter
    assert (loader.rank, loader.world_size) == (1, 2) and loader.plan().rank == 1
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(DataError, match="rank/world_size"):
        resolve_rank_world()


# ---------------------------------------------------------------------------------------------
# corrupt data
# ---------------------------------------------------------------------------------------------


def _corrupt_set(kit, tmp_path):
    """6 images in 3 shards; image 2 is a truncated PNG, the json of image 5 is garbage.

    Both are damaged inside the shards after conversion (the converter refuses a truncated image).
    """
    images = [kit.img(i, 32, 24) for i in range(1, 7)]
    anns = [kit.ann(i, i, [2, 2, 10, 10]) for i in range(1, 7)]
    ann, d = kit.write_coco(tmp_path, images, anns)
    out = tmp_path / "shards"
    convert_coco(ann, d, out, shard_size=2, num_workers=0, progress=False, verbose=False)

    def damage(name: str, data: bytes) -> bytes:
        if name.startswith("000000000002") and name.endswith(".png"):
            return data[: len(data) // 2]
        if name.startswith("000000000005") and name.endswith(".json"):
            return b"{broken json"
        return data

    for shard in (out / "shard-000000.tar", out / "shard-000002.tar"):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for m, data in members:
                data = damage(m.name, data)
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
    return out


def test_corrupt_samples_are_skipped_warned_and_counted(kit, tmp_path):
    out = _corrupt_set(kit, tmp_path)
    loader = _loader(out, False, batch_size=2, num_workers=0)
    with pytest.warns(RuntimeWarning, match="skipped corrupt sample") as rec:
        batches = list(loader)
    messages = " | ".join(str(w.message) for w in rec)
    assert "cannot decode image" in messages and "000000000002" in messages and "invalid annotations" in messages
    assert sorted(i for b in batches for i in b.image_ids if i >= 0) == [1, 3, 4, 6]
    assert loader.num_skipped == loader.num_skipped_epoch == 2
    assert len(batches) == len(loader)

    loader2 = _loader(out, False, batch_size=2, num_workers=2)  # counts travel back from workers
    assert len(list(loader2)) == len(loader2) and loader2.num_skipped == 2

    train = _loader(out, True, batch_size=2, num_workers=0, shuffle_buffer=0)
    with pytest.warns(RuntimeWarning):
        tb = list(train)
    assert len(tb) == len(train) == 3 and train.num_skipped >= 1
    assert all(i in (1, 3, 4, 6) for b in tb for i in b.image_ids)


def test_truncated_tar_is_skipped_and_counted(shard_dir, tmp_path):
    import shutil

    index, root = load_index(shard_dir)
    for s in index.shards:
        shutil.copy(root / s.file, tmp_path / s.file)
    shutil.copy(root / "index.json", tmp_path / "index.json")
    victim = tmp_path / index.shards[1].file
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    loader = _loader(tmp_path, False, batch_size=4)
    with pytest.warns(RuntimeWarning, match="skipped corrupt sample"):
        batches = list(loader)
    assert loader.num_skipped >= 1 and len(batches) == len(loader)
    assert 20 <= len([i for b in batches for i in b.image_ids if i >= 0]) < 26


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


def _sig(batch):
    return tuple(batch.image_ids), round(float(batch.images.sum()), 2), tuple(batch.images.shape)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_skips_to_the_same_position(shard_dir, num_workers):
    def make():
        return _loader(shard_dir, True, batch_size=3, num_workers=num_workers, rank=1, world_size=2,
                       shuffle_buffer=6, seed=3, transforms=SMALL_DETR)

    first = make()
    first.set_epoch(2)
    it = iter(first)
    head = [_sig(next(it)) for _ in range(2)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches_consumed"] == 2 and state["seed"] == 3
    tail = [_sig(b) for b in it]
    assert len(head) + len(tail) == len(first) == 5

    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.epoch == 2 and resumed.batches_consumed == 2
    assert [_sig(b) for b in resumed] == tail  # same batches, same augmentation
    assert resumed.epoch == 3 and resumed.state_dict()["batches_consumed"] == 0


def test_resume_with_other_layout_warns_and_keeps_epoch_length(shard_dir):
    loader = _loader(shard_dir, True, batch_size=3, num_workers=0, rank=0, world_size=2, shuffle_buffer=0)
    state = {**loader.state_dict(), "batches_consumed": 2, "num_workers": 4}
    with pytest.warns(RuntimeWarning, match="4/2/3 -> 0/2/3.*continues at batch 2 of 5"):
        loader.load_state_dict(state)
    assert loader.batches_consumed == 2
    state = {**loader.state_dict(), "batches_consumed": 2, "world_size": 1}  # 2 batches of 3x1 -> 1 of 3x2
    with pytest.warns(RuntimeWarning, match="different loader layout"):
        loader.load_state_dict(state)
    assert len(list(loader)) == len(loader) - 1
    with pytest.raises(DataError, match="invalid loader state"):
        loader.load_state_dict({"epoch": 1})


# ---------------------------------------------------------------------------------------------
# sources and configs
# ---------------------------------------------------------------------------------------------


def test_sources_index_dir_pattern_and_pipe(shard_dir, synth_json):
    from_dir = resolve_shards(shard_dir)
    from_file = resolve_shards(shard_dir / "index.json")
    pattern = resolve_shards(str(shard_dir / "shard-{000000..000006}.tar"))
    assert from_dir.urls == from_file.urls and from_dir.sizes == pattern.sizes == (4, 4, 4, 4, 4, 3, 3)
    assert pattern.info.num_classes == 6 and pattern.info.label_to_category_id == [1, 2, 3, 5, 7, 9]

    urls = [f"pipe:cat {u}" for u in from_dir.urls]
    with pytest.raises(DataError, match="num_samples"):
        resolve_shards(urls)
    with pytest.warns(RuntimeWarning, match="per-shard sample counts unknown"):
        loader = _loader(urls, False, batch_size=4, num_samples=26)
    assert loader.info.categories is None
    ids = [i for b in loader for i in b.image_ids if i >= 0]
    assert sorted(ids) == sorted(im["id"] for im in synth_json["images"])


def test_data_source_config_validation(shard_dir):
    with pytest.raises(ValidationError, match="exactly one of 'shards', 'index' or 'coco'.*got none"):
        DataSourceConfig()
    with pytest.raises(ValidationError, match="got 'shards', 'index'"):
        DataSourceConfig(index=shard_dir, shards="x.tar")
    with pytest.raises(ValidationError, match="batch_size"):
        DataSourceConfig(index=shard_dir, batch_size=0)
    with pytest.raises(ValidationError, match="extra"):
        DataSourceConfig(index=shard_dir, bogus=1)
    with pytest.raises(ValidationError, match="num_samples"):
        DataSourceConfig(index=shard_dir, num_samples=10)
    with pytest.raises(ValidationError, match="transforms.kind"):
        DataSourceConfig(index=shard_dir, transforms={"kind": "bad"})


def test_build_loader_from_index_and_coco_agree(synth_set, shard_dir):
    common = {"batch_size": 4, "num_workers": 0, "transforms": NONE}
    shard_loader = build_loader({"index": str(shard_dir), **common}, "val", rank=0, world_size=1)
    coco_loader = build_loader(
        {"coco": {"ann_file": str(synth_set.ann_file), "images_dir": str(synth_set.images_dir)}, **common},
        "val", rank=0, world_size=1,
    )
    assert isinstance(shard_loader, ShardLoader) and isinstance(coco_loader, CocoFolderLoader)
    assert shard_loader.info.num_classes == coco_loader.info.num_classes == 6
    a = {i: (b.targets[k], b.images[k]) for b in shard_loader for k, i in enumerate(b.image_ids)}
    c = {i: (b.targets[k], b.images[k]) for b in coco_loader for k, i in enumerate(b.image_ids)}
    assert a.keys() == c.keys()
    for i in a:  # same decode path, same batch composition -> identical tensors
        assert torch.equal(a[i][0].boxes, c[i][0].boxes) and torch.equal(a[i][0].labels, c[i][0].labels)
        assert torch.equal(a[i][1], c[i][1])
    train = build_loader({"index": str(shard_dir), **common}, "train", rank=0, world_size=1, seed=1)
    assert train.train and len(train) == math.ceil(26 / 4)


def test_coco_folder_loader_ddp_semantics(synth_set, synth_json):
    ds = CocoFolderDataset(synth_set.ann_file, synth_set.images_dir, build_transforms(NONE, False))
    assert len(ds) == 26 and ds[0].image_id == synth_json["images"][0]["id"]
    seen, counts = [], []
    for rank in range(3):
        loader = CocoFolderLoader(ds, LoaderOptions(train=False, batch_size=4, num_workers=0, rank=rank, world_size=3))
        batches = list(loader)
        counts.append(len(batches))
        seen += [i for b in batches for i in b.image_ids if i >= 0]
    assert len(set(counts)) == 1 and sorted(seen) == sorted(im["id"] for im in synth_json["images"])
    lens = set()
    for rank in range(3):
        loader = CocoFolderLoader(ds, LoaderOptions(train=True, batch_size=4, num_workers=2, rank=rank, world_size=3, seed=2))
        batches = list(loader)
        lens.add((len(batches), len(loader)))
        assert all(len(b) == 4 for b in batches)
    assert lens == {(3, 3)}
    resumed = CocoFolderLoader(ds, LoaderOptions(train=True, batch_size=4, rank=0, world_size=3, seed=2))
    full = [b.image_ids for b in resumed]
    resumed.load_state_dict({**resumed.state_dict(), "epoch": 0, "batches_consumed": 1})
    assert [b.image_ids for b in resumed] == full[1:]


def test_source_categories_reads_only_metadata(synth_set, shard_dir):
    expected = [1, 2, 3, 5, 7, 9]
    for src in (
        {"index": str(shard_dir)},
        {"shards": str(shard_dir / "shard-{000000..000006}.tar")},
        {"coco": {"ann_file": str(synth_set.ann_file), "images_dir": str(synth_set.images_dir)}},
    ):
        cats = source_categories(src)
        assert [c["id"] for c in cats] == expected and cats[3]["name"] == "star"
    assert source_categories({"shards": f"pipe:cat {shard_dir / 'shard-000000.tar'}", "num_samples": 4}) is None
    with pytest.raises(DataError, match="cannot read the COCO annotation file"):
        source_categories({"coco": {"ann_file": "/nonexistent/a.json", "images_dir": "/nonexistent"}})


def test_lsj_loader_pads_every_batch_to_the_fixed_canvas(shard_dir):
    cfg = {"index": str(shard_dir), "batch_size": 4, "num_workers": 0, "size_divisor": 32,
           "transforms": {"kind": "lsj", "lsj_image_size": 160, "lsj_scale_range": [0.3, 1.5]}}
    for split in ("train", "val"):
        loader = build_loader(cfg, split, rank=0, world_size=1)
        for batch in loader:
            assert tuple(batch.images.shape[-2:]) == (160, 160)
            for i, (h, w) in enumerate(batch.image_sizes.tolist()):
                assert h <= 160 and w <= 160 and not batch.masks[i, :h, :w].any() and batch.masks[i, h:].all()
                boxes = batch.targets[i].boxes
                assert (boxes[:, 2] <= w + 1e-4).all() and (boxes[:, 3] <= h + 1e-4).all()
