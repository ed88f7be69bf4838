"""Inference latency of every DETR variant recipe side by side (CPU or GPU), full-size models, random weights.

Each recipe's model is built exactly as ``codetr train`` builds it (R50, real widths and depths, no pretrained
weights: ``model.backbone.weights=null``; ``model.num_classes`` 80) and runs ``Detector.predict`` (backbone, encoder,
decoder, post-processing: what ``codetr predict`` pays per image) on one image of ``--size`` in eval mode under
``torch.inference_mode()``. After one untimed warm-up per model the models run **round-robin** for ``--repeats``
rounds (order rotated every round) so that background load hits every row alike; medians are reported.

    OMP_NUM_THREADS=2 python benchmarks/variant_latency.py --threads 2 --repeats 3
    python benchmarks/variant_latency.py --recipes recipes/conditional_detr_r50.yaml recipes/dab_detr_r50.yaml

Run it on an idle machine (no other jobs): with 2 cores a concurrent job makes every figure 2-5x off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

DEFAULT_RECIPES = ["conditional_detr_r50", "dab_detr_r50", "deformable_detr_pp_r50", "h_deformable_detr_r50",
                   "dino_r50"]


def build(recipe: str, device: str):
    import torch

    from codetr.assembly import build_detector, load_recipe

    r = load_recipe(recipe, ["model.backbone.weights=null", "model.num_classes=80", "model.ema=null"],
                    read_data=False)
    torch.manual_seed(0)
    return build_detector(r.model).to(device).eval()


def batch_for(size: tuple[int, int], device: str):
    import torch

    from codetr.core.structures import Batch

    h, w = size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, h, w, generator=g).to(device)
    return Batch(images=images, masks=torch.zeros(1, h, w, dtype=torch.bool, device=device), targets=[],
                 image_sizes=torch.tensor([[h, w]]), orig_sizes=torch.tensor([[h, w]]), image_ids=[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=[f"recipes/{n}.yaml" for n in DEFAULT_RECIPES])
    ap.add_argument("--size", default="800x1333", help="HxW of the input image")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(int(x) for x in args.size.lower().split("x"))
    batch = batch_for(size, args.device)
    console = Console()
    models = {}
    for recipe in args.recipes:
        name = Path(recipe).stem
        models[name] = build(recipe, args.device)
        with torch.inference_mode():
            models[name].predict(batch)  # warm-up
        console.print(f"built + warmed up {name} "
                      f"({sum(p.numel() for p in models[name].parameters()) / 1e6:.1f} M parameters)")
    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if args.device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.inference_mode():
                models[name].predict(batch)
            if args.device != "cpu":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    ref = "deformable_detr_pp_r50" if "deformable_detr_pp_r50" in times else names[0]
    ref_t = statistics.median(times[ref])
    table = Table(title=f"Detector.predict, batch 1, {size[0]}x{size[1]}, {args.device}, "
                        f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for col in ("recipe", "params (M)", "median s", f"x {ref}"):
        table.add_column(col, justify="right")
    rows = []
    for name in names:
        med = statistics.median(times[name])
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        rows.append({"recipe": name, "params_m": round(params, 1), "median_s": med, "all_s": times[name]})
        table.add_row(name, f"{params:.1f}", f"{med:.2f}", f"{med / ref_t:.2f}")
    console.print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"size": size, "device": args.device, "threads": torch.get_num_threads(),
                                              "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
