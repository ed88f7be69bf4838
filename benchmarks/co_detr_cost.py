"""Training cost of Co-DETR's auxiliary branch: K = 0 vs K = 1 (ATSS) vs K = 2 (ATSS + Faster R-CNN).

Same recipe, same batches, same process for the timings (configurations interleaved round-robin so
background load hits them equally). Training memory is measured in a fresh subprocess per configuration:
the peak resident set during the training steps minus the resident set just before them (model, data and
the Python/torch runtime excluded), read from ``/proc/self/status`` after resetting the peak through
``/proc/self/clear_refs`` (Linux); elsewhere it falls back to ``ru_maxrss`` (absolute, includes the runtime). Inference must cost the same for every K (only the DETR branch runs): it is timed
too.

    python benchmarks/co_detr_cost.py --recipe recipes/quickstart.yaml --steps 8 --threads 2

Paper reference: +23 % (K = 1) and +71 % (K = 2) GPU hours; codetr's target on CPU: at most +20 % / +40 %.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIGS = {
    "K=0": ["model.aux_heads=[]", "model.query_encoder=null"],
    "K=1 (ATSS)": ["model.aux_heads=[{type: atss, feat_channels: 128}]"],
    "K=2 (ATSS + Faster R-CNN)": [],
}


def _build(recipe: str, overrides: list[str]):
    from codetr.assembly import build_detector
    from codetr.assembly import load_recipe

    r = load_recipe(recipe, overrides)
    torch.manual_seed(0)
    model = build_detector(r.model)
    return r, model


def _batches(recipe, n: int):
    from codetr.data.loader import build_loader

    loader = build_loader(recipe.data.train, "train", train=True, seed=0)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _step(model, opt, batch) -> float:
    t = time.perf_counter()
    losses = model.loss(batch)
    sum(v for k, v in losses.items() if "loss" in k).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _training_memory(recipe: str, name: str, steps: int) -> float:
    """Peak RSS growth (MiB) over ``steps`` training steps of one configuration (run in this process)."""
    r, model = _build(recipe, CONFIGS[name])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = _batches(r, steps)
    before = _proc_status_mib("VmRSS")
    delta = before is not None and _reset_peak()
    for b in batches:
        _step(model.train(), opt, b)
    if not delta:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (_proc_status_mib("VmHWM") or 0.0) - before


def peak_memory(recipe: str, name: str, steps: int, threads: int) -> float:
    """Run ``steps`` training steps of one configuration in a subprocess; return its training memory (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--recipe", recipe, "--threads", str(threads), "--steps", str(steps),
                          "--only-memory", name], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only-memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.only_memory:
        print(_training_memory(args.recipe, args.only_memory, args.steps))
        return

    built = {name: _build(args.recipe, ov) for name, ov in CONFIGS.items()}
    batches = _batches(next(iter(built.values()))[0], 4)
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, (_, m) in built.items()}
    times: dict[str, list[float]] = {n: [] for n in built}
    for step in range(args.steps + 2):
        for name, (_, model) in built.items():
            t = _step(model.train(), opts[name], batches[step % len(batches)])
            if step >= 2:
                times[name].append(t)
    # inference: copy the K=2 DETR weights into every model so outputs can be compared
    ref_sd = {k: v for k, v in built["K=2 (ATSS + Faster R-CNN)"][1].state_dict().items()
              if not k.startswith("collaborative.")}
    infer: dict[str, list[float]] = {n: [] for n in built}
    outputs = {}
    for name, (_, model) in built.items():
        model.load_state_dict(ref_sd, strict=False)
        model.eval()
    for step in range(args.steps + 1):
        for name, (_, model) in built.items():
            t = time.perf_counter()
            dets = model.predict(batches[0])
            if step:
                infer[name].append(time.perf_counter() - t)
            outputs[name] = dets[0].boxes
    base = statistics.median(times["K=0"])
    base_inf = statistics.median(infer["K=0"])
    rows = []
    for name in built:
        mem = peak_memory(args.recipe, name, 3, args.threads)
        rows.append({"config": name, "train_step_s": statistics.median(times[name]),
                     "train_rel": statistics.median(times[name]) / base, "train_memory_mib": mem,
                     "infer_s": statistics.median(infer[name]), "infer_rel": statistics.median(infer[name]) / base_inf,
                     "same_predictions_as_K0": bool(torch.equal(outputs[name], outputs["K=0"]))})
    base_mem = rows[0]["train_memory_mib"]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Co-DETR cost ({args.recipe}, {args.threads} threads, median of {args.steps} steps)")
    for col in ("config", "train step", "vs K=0", "train memory", "vs K=0", "inference", "vs K=0", "same preds"):
        table.add_column(col, justify="right")
    for r in rows:
        r["mem_rel"] = r["train_memory_mib"] / base_mem
        table.add_row(r["config"], f"{r['train_step_s']:.3f} s", f"{r['train_rel'] - 1:+.0%}", f"{r['train_memory_mib']:.0f} MiB",
                      f"{r['mem_rel'] - 1:+.0%}", f"{r['infer_s'] * 1000:.0f} ms", f"{r['infer_rel'] - 1:+.0%}",
                      str(r["same_predictions_as_K0"]))
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
