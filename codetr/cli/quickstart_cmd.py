"""``codetr quickstart``: synthetic data -> train a small Co-DETR on CPU -> COCO AP table -> picture."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from codetr.cli.common import SET_HELP, console, user_errors


def quickstart(
    recipe: Annotated[Path, typer.Option(help="Recipe to train.")] = Path("recipes/quickstart.yaml"),
    data_dir: Annotated[Path, typer.Option(help="Synthetic dataset folder (made if missing).")] = Path("data/synth"),
    output_dir: Annotated[Path, typer.Option(help="Run folder (checkpoints, metrics, picture).")] = Path("runs/quickstart"),
    num_train: Annotated[int, typer.Option(min=1, help="Training images to generate.")] = 1000,
    num_val: Annotated[int, typer.Option(min=1, help="Validation images to generate.")] = 200,
    seed: Annotated[int, typer.Option(help="Dataset seed (the dataset, not the training seed).")] = 0,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore checkpoints of an earlier quickstart run.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help=SET_HELP)] = None,
) -> None:
    """Train and evaluate a small Co-Deformable-DETR on a synthetic dataset, on CPU, in about 10 minutes.

    Steps: generate the synthetic shapes dataset (once), train RECIPE, evaluate on the validation split
    (COCO AP table), and save OUTPUT_DIR/predictions.png with ground truth next to predictions.
    Re-running continues or re-evaluates the previous run (use --fresh to start over).
    """
    from codetr.assembly import load_recipe
    from codetr.data.synth import make_synthetic_splits

    start = time.perf_counter()
    with user_errors():
        train_ann = data_dir / "train" / "annotations.json"
        if not train_ann.is_file() or not (data_dir / "val" / "annotations.json").is_file():
            console.rule("[bold]1/4 synthetic dataset")
            console.print(f"writing {num_train} training and {num_val} validation images to {data_dir} ...")
            make_synthetic_splits(data_dir, num_train, num_val, seed, overwrite=True)
        else:
            console.print(f"using the synthetic dataset in {data_dir}")
        overrides = [
            f"data.train.coco.ann_file={data_dir / 'train' / 'annotations.json'}",
            f"data.train.coco.images_dir={data_dir / 'train' / 'images'}",
            f"data.val.coco.ann_file={data_dir / 'val' / 'annotations.json'}",
            f"data.val.coco.images_dir={data_dir / 'val' / 'images'}",
        ] + list(set_ or [])
        resolved = load_recipe(recipe, overrides)
        from codetr.engine.trainer import Trainer

        console.rule("[bold]2/4 training")
        trainer = Trainer(resolved, resume=None if fresh else "auto", output_dir=output_dir, overwrite=fresh)
        result = trainer.fit()
        console.rule("[bold]3/4 evaluation (COCO, validation split)")
        if result.get("status") == "finished" and trainer.last_eval is not None:
            console.print("(evaluated at the end of training, table above)")
            ap, ap50 = trainer.last_eval["AP"], trainer.last_eval["AP50"]
            metrics_dict = trainer.last_eval
        else:
            metrics = trainer.evaluate()
            ap, ap50 = metrics.AP, metrics.AP50
            metrics_dict = metrics.as_dict(per_class=False)
        console.rule("[bold]4/4 picture")
        picture = output_dir / "predictions.png"
        save_prediction_grid(trainer.model, resolved, data_dir / "val", picture)
    minutes = (time.perf_counter() - start) / 60
    (output_dir / "quickstart_metrics.json").write_text(json.dumps(metrics_dict, indent=2))
    console.print(f"[bold green]quickstart done[/] in {minutes:.1f} min: box AP = {ap:.3f} (AP50 {ap50:.3f}); "
                  f"predictions picture: {picture}")


def save_prediction_grid(model, recipe, split_dir: Path, path: Path, num_images: int = 4) -> Path:
    """Ground truth next to predictions for the first ``num_images`` validation images, stacked vertically."""
    import torch
    from PIL import Image

    from codetr.data.collate import collate
    from codetr.data.decode import load_image_rgb, meta_to_target
    from codetr.data.coco_folder import CocoFolderDataset
    from codetr.data.transforms import build_transforms
    from codetr.engine.visualize import display_threshold, draw_side_by_side

    detector = getattr(model, "module", model)
    dataset = CocoFolderDataset(split_dir / "annotations.json", split_dir / "images",
                                transform=build_transforms(recipe.data.val.transforms, train=False))
    names = [c["name"] if isinstance(c, dict) else c.name for c in dataset.info.categories]
    device = next(detector.parameters()).device
    rows = []
    detector.eval()
    for index in range(min(num_images, len(dataset))):
        sample = dataset.load(index)
        batch = collate([sample]).to(device)
        with torch.no_grad():
            det = detector.predict(batch)[0].to("cpu")
        original = load_image_rgb(dataset.records[index].path)
        gt = meta_to_target(dataset.meta(index))
        threshold = display_threshold(det.scores, len(gt))
        rows.append(draw_side_by_side(original, gt, det, names, score_threshold=threshold))
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, sum(r.height for r in rows) + 8 * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height + 8
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)
