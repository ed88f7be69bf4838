"""A real 2-process gloo run: uneven shards + a padding duplicate, gathered on every rank."""

from __future__ import annotations

import json
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from codetr.evaluation import CocoEvaluator, evaluate_coco_results
from tests.evaluation._fixtures import make_coco_fixture, results_to_detections


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gt, results = make_coco_fixture()
        ids = [im["id"] for im in gt["images"]]
        mine = ids[rank::world]
        if rank == 1:
            mine = mine + [ids[0]]  # the stream pads the short rank with a sample rank 0 already has
        ev = CocoEvaluator(gt, max_dets=300)
        ev.update(mine, results_to_detections(results, mine))
        ev.synchronize()
        m = ev.compute()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"stats": m.stats, "num_images": m.num_images, "dups": ev.num_duplicates}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or "fork" not in mp.get_all_start_methods(),
                    reason="needs torch.distributed (gloo) and the fork start method")
def test_two_process_gather(tmp_path):
    # fork: the children inherit the imported torch/codetr (spawn re-imports them: seconds on 2 cores)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    gt, results = make_coco_fixture()
    ref = evaluate_coco_results(results, gt, max_dets=300)
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["stats"] == ref.stats
        assert out["num_images"] == 50 and out["dups"] == 1
