"""Does collaborative hybrid assignment help? K = 0 vs K = 1 vs K = 2 and the paper's Table 6 ablations.

Trains the same small model on the synthetic shapes set at equal iterations and seeds, evaluates COCO AP
on the validation split, and prints/writes a table. Configurations (all from one recipe):

* ``K=0``            Deformable-DETR++ alone (no aux heads, no positive queries)
* ``K=1``            + ATSS head and its customized positive queries
* ``K=2``            + ATSS and Faster R-CNN heads and their positive queries (the recipe)
* ``aux-only``       K = 2 heads, no positive queries (Table 6: auxiliary heads only)
* ``queries-only``   K = 2 positive queries, aux-head losses weighted 0 (Table 6: positive queries only)

    python benchmarks/convergence.py --iterations 600 --seeds 0 1 --out benchmarks/results/convergence.json

Each run is a normal ``codetr`` training run (``runs/convergence/<config>_s<seed>``); results are appended
to the JSON as they finish, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CONFIGS = {
    "K=0": ["model.aux_heads=[]", "model.query_encoder=null"],
    "K=1": ["model.aux_heads=[{type: atss, feat_channels: 128}]"],
    "K=2": [],
    "aux-only": ["model.co_detr.with_pos_queries=false", "model.query_encoder=null"],
    "queries-only": ["model.co_detr.lambda_2=0"],
}


def run(recipe: str, config: str, seed: int, iterations: int, data_dir: str, out_root: Path) -> dict:
    from rich.console import Console

    from codetr.assembly import load_recipe
    from codetr.engine.trainer import Trainer

    milestone = max(1, int(iterations * 0.85))
    overrides = CONFIGS[config] + [
        f"runtime.seed={seed}", f"schedule.iterations={iterations}", f"schedule.milestones=[{milestone}]",
        f"data.train.coco.ann_file={data_dir}/train/annotations.json", f"data.train.coco.images_dir={data_dir}/train/images",
        f"data.val.coco.ann_file={data_dir}/val/annotations.json", f"data.val.coco.images_dir={data_dir}/val/images",
        "eval.per_class=false",
    ]
    r = load_recipe(recipe, overrides)
    t = time.perf_counter()
    trainer = Trainer(r, output_dir=out_root / f"{config.replace('=', '')}_s{seed}", console=Console(quiet=True),
                      progress=False)
    result = trainer.fit()
    ev = result.get("last_eval") or trainer.evaluate().as_dict(per_class=False)
    return {"config": config, "seed": seed, "iterations": iterations, "AP": ev["AP"], "AP50": ev["AP50"],
            "AP75": ev["AP75"], "minutes": (time.perf_counter() - t) / 60}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--data-dir", default="data/synth")
    ap.add_argument("--out", default="benchmarks/results/convergence.json")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else []
    done = {(r["config"], r["seed"], r["iterations"]) for r in results}
    console = Console()
    for seed in args.seeds:
        for config in args.configs:
            if (config, seed, args.iterations) in done:
                continue
            console.print(f"[bold]{config}[/] seed {seed}: training {args.iterations} iterations ...")
            res = run(args.recipe, config, seed, args.iterations, args.data_dir, Path("runs/convergence"))
            console.print(f"  AP {res['AP']:.3f}  AP50 {res['AP50']:.3f}  ({res['minutes']:.1f} min)")
            results.append(res)
            out.write_text(json.dumps(results, indent=2))
    table = Table(title=f"synthetic shapes, {args.iterations} iterations, seeds {args.seeds}")
    for col in ("config", "AP (mean)", "AP per seed", "AP50 (mean)", "min/run"):
        table.add_column(col, justify="right")
    for config in args.configs:
        rows = [r for r in results if r["config"] == config and r["iterations"] == args.iterations]
        if not rows:
            continue
        table.add_row(config, f"{statistics.mean(r['AP'] for r in rows):.3f}",
                      " / ".join(f"{r['AP']:.3f}" for r in rows), f"{statistics.mean(r['AP50'] for r in rows):.3f}",
                      f"{statistics.mean(r['minutes'] for r in rows):.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
