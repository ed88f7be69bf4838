"""codetr Deformable-DETR++ vs HuggingFace ``transformers`` DeformableDetr: latency in one process.

Both models are the same network: ResNet-50 (HF's own ResNet, no timm) C3..C5 + one extra level, d_model 256,
8 heads, 4 levels x 4 points, 6 + 6 layers, FFN 2048, 300 queries, 80 classes, two-stage + iterative box
refinement, dropout 0. The HF model is built from its config with random weights (every weight and BN
statistic drawn at random with a fixed seed, so the sampling offsets and attention weights are not HF's
zero-initialised ones: a trained model samples query-dependent locations), then converted into codetr with
:func:`codetr.convert.hf.convert_hf_deformable_detr` into the detector :func:`codetr.convert.hf.hf_recipe_model`
describes (``mixed_selection`` / ``look_forward_twice`` off, ``two_stage_mask_invalid`` off, neck conv bias
on: the HF-equivalent options). That pair computes the same function, which is checked (max abs diff of the
final logits / boxes / encoder memory). A third row times codetr with the actual Deformable-DETR++ flags
(mixed query selection + look-forward-twice; its extra content-query embedding is random), which costs the same.

Timed:

* inference: batch 1, ``--size`` (default 800x1333), eval mode, ``torch.inference_mode``; HF: ``model(pixel_values,
  pixel_mask)``; codetr: ``Detector.encode`` + ``make_queries`` + ``decode`` (the same network outputs; no
  post-processing on either side). ``--warmup`` untimed runs, then ``--repeats`` timed runs; medians.
* train step: batch ``--train-batch`` (2) at ``--train-size`` (512x512; the second image padded to 7/8 of the
  height), train mode, forward + backward of the same synthetic loss on both sides
  (``mean(last-layer logits) + mean(last-layer boxes) + mean(two-stage proposal logits)``; HF's own loss needs
  labels and differs from the reference losses, see docs/benchmarks.md), gradients zeroed between steps,
  no optimizer step. Backbone: stem + stage 1 frozen on both sides (HF 5.x with its own ResNet freezes the whole
  backbone by a naming accident; the benchmark unfreezes stages 2-4 so both train the same parameters).

Usage::

    python benchmarks/latency.py --threads 2 --repeats 5
    python benchmarks/latency.py --device cuda --repeats 20 --size 800x1333

Needs ``transformers`` (a test / benchmark extra) and ``rich``.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codetr.convert.hf import convert_hf_deformable_detr, hf_recipe_model  # noqa: E402
from codetr.assembly import build_detector  # noqa: E402
from codetr.assembly import load_recipe_dict  # noqa: E402
from codetr.core.structures import Batch  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[x,](\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 800x1333, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model and mode (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--size", type=_size, default=(800, 1333), help="inference input HxW (default 800x1333)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--train-size", type=_size, default=(512, 512), help="train-step input HxW (default 512x512)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--no-pp", action="store_true", help="skip the Deformable-DETR++-flags row")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one codetr forward")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- models
def hf_config(num_queries: int = 300):
    from transformers import DeformableDetrConfig, ResNetConfig

    return DeformableDetrConfig(
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]), use_timm_backbone=False,
        use_pretrained_backbone=False, backbone=None, num_labels=80, d_model=256, encoder_layers=6, decoder_layers=6,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_queries=num_queries, two_stage_num_proposals=num_queries,
        with_box_refine=True, two_stage=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    """Random weights of realistic scale for every float parameter / buffer (tied parameters stay tied)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g)
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
        elif name.endswith("running_mean"):
            t.copy_(0.1 * r)
        elif name.endswith("level_embed") or "embedding" in name:
            t.copy_(r)
        elif t.dim() >= 2:
            t.copy_(r / t[0].numel() ** 0.5)
        elif re.search(r"(norm|normalization|input_proj\.\d+\.1)\.weight$", name):
            t.copy_(1 + 0.1 * r)
        else:
            t.add_(0.1 * r)


def build_models(seed: int, pp: bool):
    from transformers import DeformableDetrForObjectDetection

    cfg = hf_config()
    torch.manual_seed(seed)
    hf = DeformableDetrForObjectDetection(cfg)
    randomize(hf, seed + 1)
    model_cfg = hf_recipe_model(cfg)
    ours = build_detector(load_recipe_dict({"name": "hf_equivalent", "model": model_cfg, "schedule": {"epochs": 1}},
                                           read_data=False).model)
    sd, report = convert_hf_deformable_detr(hf.state_dict(), target_keys=ours.state_dict().keys())
    ours.load_state_dict(sd, strict=True)
    models = {"HF transformers": hf, "codetr (HF-equivalent)": ours}
    if pp:
        pp_cfg = dict(model_cfg, variant=dict(model_cfg["variant"], mixed_selection=True, look_forward_twice=True))
        pp_model = build_detector(load_recipe_dict({"name": "deformable_detr_pp", "model": pp_cfg,
                                                    "schedule": {"epochs": 1}}, read_data=False).model)
        missing, _ = pp_model.load_state_dict(sd, strict=False)
        assert missing == ["variant.query_embedding.weight"], missing
        randomize(pp_model.variant.query_embedding, seed + 2)
        models["codetr Deformable-DETR++ flags"] = pp_model
    # HF 5.x freezes its whole ResNet (parameter-name test never matches); train the same stages as codetr
    for name, prm in hf.model.backbone.model.named_parameters():
        prm.requires_grad_(bool(re.search(r"encoder\.stages\.[123]\.", name)))
    return cfg, models, report


def make_batch(b: int, hw: tuple[int, int], device: torch.device, seed: int, pad_last: bool) -> Batch:
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    images = torch.randn(b, 3, h, w, generator=g)
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    sizes = [(h, w)] * b
    if pad_last and b > 1:
        vh = h * 7 // 8
        images[-1, :, vh:] = 0
        masks[-1, vh:] = True
        sizes[-1] = (vh, w)
    return Batch(images=images, masks=masks, targets=[], image_sizes=torch.tensor(sizes),
                 orig_sizes=torch.tensor(sizes), image_ids=list(range(b))).to(device)


def is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def forward(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """Final-layer logits / boxes, two-stage proposal logits and encoder memory of either implementation."""
    if is_hf(model):
        out = model(pixel_values=batch.images, pixel_mask=(~batch.masks).long())
        return {"logits": out.logits, "boxes": out.pred_boxes, "enc_logits": out.enc_outputs_class,
                "memory": out.encoder_last_hidden_state}
    memory = model.encode(batch)
    group = model.variant.make_queries(memory, None)[0]
    out = model.variant.decode(group, memory)
    return {"logits": out.logits[-1], "boxes": out.boxes[-1], "enc_logits": memory.extras["enc_logits"],
            "memory": memory.memory}


def synthetic_loss(out: dict[str, Tensor]) -> Tensor:
    return out["logits"].mean() + out["boxes"].mean() + out["enc_logits"].mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Warm every function up, then time them round-robin (order rotated each round), so that background load
    on a shared machine hits all models alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def infer_step(model: nn.Module, batch: Batch) -> Callable[[], dict[str, Tensor]]:
    def run():
        with torch.inference_mode():
            return forward(model, batch)
    return run


def train_step(model: nn.Module, batch: Batch) -> Callable[[], float]:
    def run():
        model.zero_grad(set_to_none=True)
        loss = synthetic_loss(forward(model, batch))
        loss.backward()
        return float(loss.detach())
    return run


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, float]:
    out = {}
    for k in a:
        x, y = a[k].detach().float().cpu(), b[k].detach().float().cpu()
        fin = torch.isfinite(y)
        out[k] = float((x[fin] - y[fin]).abs().max()) if fin.any() else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda requested but CUDA is not available[/red]")
        return 2
    import transformers

    cfg, models, report = build_models(args.seed, pp=not args.no_pp)
    for m in models.values():
        m.to(device)
    hf_name, ours_name = "HF transformers", "codetr (HF-equivalent)"
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    console.print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
                  f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
                  f"conversion: {report.summary()}")
    console.print("params: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in n_params.items()))

    rows: list[tuple[str, str, list[float]]] = []
    checks: list[str] = []
    if not args.skip_infer:
        batch = make_batch(1, args.size, device, args.seed, pad_last=False)
        outs = {}
        for name, m in models.items():
            m.eval()
            outs[name] = infer_step(m, batch)()
        d = max_diff(outs[ours_name], outs[hf_name])
        checks.append("inference outputs, codetr (HF-equivalent) vs HF, max abs diff: "
                      + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
        del outs
        times = time_interleaved({n: infer_step(m, batch) for n, m in models.items()}, args.warmup, args.repeats,
                                 device)
        rows += [("inference", n, t) for n, t in times.items()]
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                infer_step(models[ours_name], batch)()
            console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        del batch
    if not args.skip_train:
        batch = make_batch(args.train_batch, args.train_size, device, args.seed + 1, pad_last=True)
        losses = {}
        for name, m in models.items():
            m.train()
            losses[name] = train_step(m, batch)()
        hf_m, ours_m = models[hf_name], models[ours_name]
        sd_ours = dict(ours_m.named_parameters())
        conv, _ = convert_hf_deformable_detr({k: p.grad for k, p in hf_m.named_parameters() if p.grad is not None},
                                             input_proj_bias="keep")
        gdiff = max(float((sd_ours[k].grad - g).abs().max()) for k, g in conv.items()
                    if k in sd_ours and sd_ours[k].grad is not None)
        checks.append(f"train step loss codetr {losses[ours_name]:.6f} vs HF {losses[hf_name]:.6f}; "
                      f"max abs gradient diff over {len(conv)} HF parameters {gdiff:.2e}")
        times = time_interleaved({n: train_step(m, batch) for n, m in models.items()}, args.warmup, args.repeats,
                                 device)
        rows += [("train step", n, t) for n, t in times.items()]

    table = Table(title=f"Deformable-DETR two-stage + refine, R50, 300 queries, FFN 2048, 6+6 layers ({device}, "
                        f"{torch.get_num_threads()} threads)")
    for col in ("mode", "model", "median ms", "min ms", "runs", "ratio vs HF"):
        table.add_column(col, justify="right" if col not in ("mode", "model") else "left")
    hf_median = {mode: statistics.median(t) for mode, name, t in rows if name == hf_name}
    for mode, name, times in rows:
        med = statistics.median(times)
        shape = (f"1x{args.size[0]}x{args.size[1]}" if mode == "inference"
                 else f"{args.train_batch}x{args.train_size[0]}x{args.train_size[1]}")
        table.add_row(f"{mode} {shape}", name, f"{med * 1e3:.0f}", f"{min(times) * 1e3:.0f}", str(len(times)),
                      f"{med / hf_median[mode]:.2f}x")
    console.print(table)
    for c in checks:
        console.print(c)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
