"""``codetr convert`` (official checkpoints -> codetr) and ``codetr export-weights``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from codetr.cli.common import SET_HELP, check_output_file, console, fail, load, user_errors

FORMATS = ("sense-x", "mmdet3", "hf")
#: recipe variant type -> the HuggingFace ``transformers`` model it converts from (``--format hf``)
HF_MODELS = {"deformable_detr": "DeformableDetrForObjectDetection",
             "conditional_detr": "ConditionalDetrForObjectDetection", "dab_detr": "DabDetrForObjectDetection"}


def _read_official(path: Path, trust: bool) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # official mmcv checkpoints may pickle metadata objects
        if not trust:
            raise ValueError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}). If you trust the file (e.g. an official release), re-run "
                "with --trust-checkpoint to allow full unpickling") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (expected a mapping of tensors, or a checkpoint with 'state_dict')")
    return obj


def _read_hf(path: Path) -> dict:
    """An HF ``transformers`` state dict: ``model.safetensors`` / ``pytorch_model.bin``, or the ``save_pretrained``
    directory holding one of them."""
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not an HF state dict (expected a mapping of tensors)")
    return obj


def convert_hf(path: Path, variant_type: str, target_keys: list[str]):
    """Read an HF ``transformers`` state dict (:func:`_read_hf`) and convert it with the converter of the recipe's
    variant (``HF_MODELS``)."""
    if variant_type not in HF_MODELS:
        raise ValueError(f"no HF transformers model is known for variant {variant_type!r}; --format hf converts "
                         + ", ".join(f"{v} ({m})" for v, m in HF_MODELS.items()))
    source = _read_hf(path)
    if variant_type == "deformable_detr":
        from codetr.convert.hf import convert_hf_deformable_detr

        return convert_hf_deformable_detr(source, target_keys=target_keys)
    if variant_type == "conditional_detr":
        from codetr.convert.hf_single_scale import convert_hf_conditional_detr

        return convert_hf_conditional_detr(source, target_keys=target_keys)
    from codetr.convert.hf_single_scale import convert_hf_dab_detr

    return convert_hf_dab_detr(source, target_keys=target_keys)


def convert_official(source: dict, fmt: str, aux_head_types: list[str], variant_type: str,
                     allow_unmatched: bool, backbone: str = "resnet"):
    """Dispatch to the converter of ``fmt`` for the recipe's variant, backbone and aux heads.

    * ``sense-x`` (Sense-X Co-DETR, MMDetection 2.x): Co-Deformable-DETR / mmdet-2 Deformable-DETR
      (``deformable_detr`` recipes) and Co-DINO (``dino`` recipes; ``query_head.label_embedding``).
    * ``mmdet3``: mmdet 3.x Deformable-DETR and DINO, and the ``projects/CO-DETR`` Co-DINO port (recognised
      by its ``query_head.*`` keys; a K = 0 ``dino`` recipe then takes only the inference part and needs
      ``--allow-unmatched`` for the aux weights).
    """
    co_dino_layout = any(k.startswith(("query_head.", "module.query_head.")) for k in source)
    if variant_type == "deformable_detr":
        if fmt == "sense-x":
            if aux_head_types:
                from codetr.convert.co_detr import convert_sense_x_co_detr

                return convert_sense_x_co_detr(source, aux_head_types, allow_unmatched=allow_unmatched,
                                               backbone=backbone)
            from codetr.convert.official import convert_sense_x_co_deformable

            prefix = "query_head." if co_dino_layout else "bbox_head."
            return convert_sense_x_co_deformable(source, head_prefix=prefix, backbone=backbone)
        from codetr.convert.official import convert_mmdet3_deformable

        return convert_mmdet3_deformable(source, backbone=backbone)
    if variant_type != "dino":
        raise ValueError(f"no official checkpoint layout is known for variant {variant_type!r}; "
                         "convertible variants: deformable_detr, dino")
    from codetr.convert import mmdet3

    if co_dino_layout:
        return mmdet3.convert_mmdet3_co_dino(source, aux_head_types, allow_unmatched=allow_unmatched,
                                             backbone=backbone)
    if fmt == "sense-x":
        raise ValueError("a Sense-X (MMDetection 2.x) DINO-family checkpoint has 'query_head.*' keys (Co-DINO); "
                         "this one has none. For an MMDetection 3.x DINO checkpoint use --format mmdet3")
    return mmdet3.convert_mmdet3_dino(source, allow_unmatched=allow_unmatched, backbone=backbone)


def convert(
    recipe: Annotated[Path, typer.Argument(help="The codetr recipe the weights are for (architecture, aux heads).")],
    checkpoint: Annotated[Path, typer.Argument(help="Official checkpoint (.pth).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output codetr checkpoint.")],
    fmt: Annotated[str, typer.Option("--format", help="sense-x (Sense-X Co-DETR / mmdet 2.x), mmdet3, or hf "
                                                     "(HF transformers Deformable / Conditional / DAB-DETR "
                                                     "model.safetensors, pytorch_model.bin or save_pretrained "
                                                     "directory).")] = "sense-x",
    allow_unmatched: Annotated[bool, typer.Option(help="Do not fail on official keys without a counterpart.")] = False,
    trust_checkpoint: Annotated[bool, typer.Option(help="Allow full unpickling (only for files you trust).")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
) -> None:
    """Convert an official Co-DETR / DETR checkpoint into a codetr checkpoint, with a key-by-key report.

    The recipe's model is built and the converted weights are loaded strictly: any missing or unexpected
    key is an error (unless --allow-unmatched), so a converted file always loads. With ``--format hf`` the
    recipe must describe the HF model (``codetr.convert.hf.hf_recipe_model`` /
    ``codetr.convert.hf_single_scale.hf_conditional_recipe_model`` / ``hf_dab_recipe_model`` write it).
    """
    from codetr.assembly import build_detector
    from codetr.core.config import recipe_to_yaml
    from codetr.engine.checkpoint import base_state, save_checkpoint

    if fmt not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_output_file(out, [recipe, checkpoint], overwrite)
    with user_errors():
        resolved = load(recipe, list(set_ or []) + ["model.backbone.weights=null"], read_data=False)
        model = build_detector(resolved.model)
        expected = model.state_dict()
        if fmt == "hf":
            sd, report = convert_hf(checkpoint, resolved.model.variant.type, list(expected))
        else:
            source = _read_official(checkpoint, trust_checkpoint)
            sd, report = convert_official(source, fmt, [h.type for h in resolved.model.aux_heads],
                                          resolved.model.variant.type, allow_unmatched, resolved.model.backbone.type)
        missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in sd if k not in expected]
        shape = [k for k in sd if k in expected and sd[k].shape != expected[k].shape]
        table = Table(title=f"conversion report: {checkpoint.name} ({fmt})")
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_column("first keys", overflow="fold")
        rows = [("converted", report.matched, "green"), ("unmatched official keys", list(report.unmatched), "red"),
                ("missing codetr keys", missing, "red"), ("unexpected converted keys", unexpected, "red"),
                ("shape mismatches", shape, "red"), ("ignored (BN counters)", report.ignored, "dim")]
        for name, keys, colour in rows:
            shown = ", ".join(str(k if not isinstance(k, tuple) else f"{k[0]} -> {k[1]}") for k in list(keys)[:4])
            table.add_row(name, f"[{colour}]{len(keys)}[/]" if keys else "0", shown)
        console.print(table)
        problems = missing or unexpected or shape or (report.unmatched and not allow_unmatched)
        if problems and not allow_unmatched:
            raise ValueError("conversion incomplete (see the report); fix the recipe so it matches the checkpoint's "
                             "architecture, or pass --allow-unmatched to write a partial checkpoint")
        model.load_state_dict({k: v for k, v in sd.items() if k in expected and sd[k].shape == expected[k].shape},
                              strict=False)
        save_checkpoint(out, base_state(model=model.state_dict(), recipe=recipe_to_yaml(resolved),
                                        converted_from=str(checkpoint), converted_format=fmt))
    console.print(f"[green]wrote[/] {out}")


def export_weights(
    checkpoint: Annotated[Path, typer.Argument(help="codetr checkpoint (training or model_final).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file.")],
    inference_only: Annotated[bool, typer.Option(help="Drop the training-only Co-DETR branch (aux heads, adapter, query encoder).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
) -> None:
    """Write the model weights of a checkpoint (no optimizer/RNG state), optionally inference-only."""
    from codetr.engine.checkpoint import base_state, extract_state_dict, load_checkpoint, save_checkpoint

    check_output_file(out, [checkpoint], overwrite)
    with user_errors():
        obj = load_checkpoint(checkpoint)
        sd = extract_state_dict(obj)
        dropped = [k for k in sd if k.startswith("collaborative.")] if inference_only else []
        sd = {k: v for k, v in sd.items() if k not in set(dropped)}
        extra = {k: obj[k] for k in ("recipe", "classes") if isinstance(obj, dict) and k in obj}
        save_checkpoint(out, base_state(model=sd, inference_only=inference_only, **extra))
    size = sum(v.numel() for v in sd.values())
    console.print(f"[green]wrote[/] {out}: {len(sd)} tensors, {size / 1e6:.1f} M values"
                  + (f" ({len(dropped)} training-only tensors dropped)" if dropped else ""))


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("export-weights")(export_weights)
