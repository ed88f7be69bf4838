"""DDP on CPU (gloo, 2 spawned processes) gives the same weights as one process with the same global batch."""

from __future__ import annotations

import os
import socket
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from .conftest import FakeDetector, make_recipe, quiet_console, recipe_dict

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, rdict: dict, out: str, nan_rank: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        from codetr.core.config.schema import Recipe
        from codetr.core.registry import Component, registry
        from codetr.engine.distributed import destroy_distributed
        from codetr.engine.trainer import Trainer

        from tests.engine.conftest import _TOYS

        for group, cfg in _TOYS.items():
            registry.register(group, cfg.model_fields["type"].default, Component(config=cfg, build=lambda c, *a: c))
        trainer = Trainer(Recipe.model_validate(rdict), model_factory=_factory(nan_rank == rank), console=quiet_console())
        assert trainer.world_size == world and isinstance(trainer.ddp_model, torch.nn.parallel.DistributedDataParallel)
        trainer.fit()
        torch.save({"model": trainer.model.state_dict(), "bad": trainer.bad_steps_total, "eval": trainer.last_eval},
                   f"{out}/rank{rank}.pt")
        destroy_distributed()
    except BaseException:  # surface the child's traceback in the test output
        traceback.print_exc(file=sys.stderr)
        raise


def _factory(nan: bool):
    def make(cfg):  # built inside the Trainer, after it seeded the RNGs: same init in every process
        model = FakeDetector(cfg.num_classes, dropout=0.0)
        if nan:
            model.nan_calls = {2}
        return model

    return make


def _single(synth, tmp_path, nan: bool):
    from codetr.engine.trainer import Trainer

    recipe = make_recipe(synth, tmp_path / "single", batch_size=4, val=nan,
                         schedule={"iterations": STEPS}, runtime={"log_period": 1})
    trainer = Trainer(recipe, model_factory=_factory(nan), console=quiet_console())
    trainer.fit()
    return trainer.model.state_dict(), trainer.bad_steps_total, trainer.last_eval


@pytest.mark.parametrize("per_rank_batch,accumulate,nan_rank", [(2, 1, 1), (1, 2, None)],
                         ids=["batch2x2ranks-nan-on-rank1", "batch1x2ranks-accumulate2"])
def test_ddp_matches_single_process_global_batch(synth_data, tmp_path, per_rank_batch, accumulate, nan_rank):
    with_eval = nan_rank is not None  # the first case also evaluates on both ranks (gather + dedup)
    expected, expected_bad, expected_eval = _single(synth_data, tmp_path, nan=nan_rank is not None)
    rdict = recipe_dict(synth_data, tmp_path / "ddp", batch_size=per_rank_batch, val=with_eval,
                        optim={"lr": 1e-3, "clip_grad_norm": 1.0, "accumulate_steps": accumulate},
                        schedule={"iterations": STEPS}, runtime={"log_period": 1})
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), rdict, str(out), nan_rank), nprocs=2, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["bad"] == r1["bad"] == expected_bad == (1 if nan_rank is not None else 0)
    for k, v in expected.items():
        assert torch.equal(r0["model"][k], r1["model"][k]), f"ranks disagree on {k}"
        torch.testing.assert_close(r0["model"][k], v, rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    if with_eval:  # 6 val images split over 2 ranks, gathered: same metrics as one process, on both ranks
        assert r0["eval"]["num_images"] == r1["eval"]["num_images"] == 6
        for key in ("AP", "AP50", "AR100", "num_detections"):
            assert r0["eval"][key] == r1["eval"][key] == pytest.approx(expected_eval[key], abs=1e-6)
    # the metrics log was written by rank 0 only, with losses averaged over ranks
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert sum('"type": "train"' in line for line in lines) == STEPS
