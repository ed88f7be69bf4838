"""The one training engine behind every recipe.

``Trainer(recipe).fit()`` builds the detector, the loaders, the optimizer and schedule, then runs the
loop below on every rank (``torchrun``/Slurm/plain python — see :mod:`codetr.engine.distributed`)::

    for each optimizer step ("iteration"):
        for each of the N micro-batches of its accumulation group (DDP no_sync on all but the last):
            batch -> device -> autocast(precision) -> detector.loss(batch) -> dict of weighted terms
            terms whose name contains "loss" are summed (others, e.g. "num_pos", are only logged)
            non-finite term on any rank -> the whole step is skipped on every rank (warning + counter)
            backward(sum / group size)          (fp16: through the GradScaler)
        clip grad norm -> optimizer step -> scheduler step
        every log_period: metrics.jsonl line; every checkpoint_period / epoch end: atomic checkpoint
        eval.period: evaluation on every rank, gathered, best checkpoint kept

Reproducibility and exact resume:

* the model is built after seeding with ``runtime.seed`` (identical on every rank); training randomness
  then uses ``seed + rank``;
* data loading never consumes the global RNGs seen by the model (augmentation is seeded per sample by
  :mod:`codetr.data`; the torch RNG draw a ``DataLoader`` makes when it starts is isolated here), and
  evaluation runs under a forked RNG, so evaluating or resuming does not change the training trajectory;
* a checkpoint stores model, optimizer, scheduler, scaler, epoch/iteration, the data-stream position and
  every rank's RNG states; ``--resume`` restores all of it, so N steps + resume + N steps equals 2N
  uninterrupted steps bit for bit on CPU (tested).

Notes: ``runtime.deterministic`` calls ``torch.use_deterministic_algorithms(True, warn_only=True)``;
on CUDA the backward of ``grid_sample`` (pure-PyTorch multi-scale deformable attention) has no
deterministic implementation, so CUDA runs of MSDA models are not bit-reproducible even then.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
import torch
from rich.console import Console
from torch import nn

from codetr.core.structures import Batch, Target
from codetr.engine import distributed as du
from codetr.engine.checkpoint import (
    base_state,
    capture_rng_state,
    checkpoint_name,
    init_from,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    recipe_sha256,
    restore_rng_state,
    save_checkpoint,
    CheckpointError,
    extract_state_dict,
)
from codetr.engine.optim import (
    OptimizerStepper,
    accumulation_groups,
    build_optimizer,
    build_scheduler,
    total_iterations,
)

if TYPE_CHECKING:  # pragma: no cover
    from codetr.core.config.schema import Recipe
    from codetr.evaluation import CocoMetrics

__all__ = ["Trainer", "TrainingError", "FitResult", "LOSS_KEY", "sum_losses"]

#: A loss-dict entry is summed into the training loss iff its name contains this; other entries are logged only.
LOSS_KEY = "loss"
_BOX_TERM = re.compile(r"bbox|box|giou|iou|l1|center|reg", re.IGNORECASE)
_COUNT_TERM = re.compile(r"(^|\.)num_pos(itives)?$")


class TrainingError(RuntimeError):
    """Training cannot continue (divergence, bad model output); the message holds the diagnosis."""


class FitResult(dict):
    """What :meth:`Trainer.fit` returns: ``iteration``, ``epoch``, ``status`` ("finished" | "preempted" |
    "already_finished"), ``best`` (metric, value, iteration) and ``last_eval`` (flat metrics)."""


# --------------------------------------------------------------------------- helpers
class _LossModule(nn.Module):
    """Routes ``forward`` to ``detector.loss`` so DDP's forward hooks (gradient sync) are used."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.detector.loss(batch)


def sum_losses(losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(total, loss terms, other entries)``; terms are the entries whose name contains ``"loss"``."""
    if not isinstance(losses, Mapping):
        raise TrainingError(f"Detector.loss must return a dict of tensors, got {type(losses).__name__}")
    terms: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for k, v in losses.items():
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v, dtype=torch.float32)
        if LOSS_KEY in k:
            if v.numel() != 1:
                raise TrainingError(f"loss term {k!r} has shape {tuple(v.shape)}; every loss term must be a scalar")
            terms[k] = v.reshape(())
        else:
            extra[k] = v
    if not terms:
        raise TrainingError(f"Detector.loss returned no loss term (no key contains {LOSS_KEY!r}): {sorted(losses)}")
    total = torch.stack([t.float() for t in terms.values()]).sum()
    return total, terms, extra


@contextlib.contextmanager
def _isolated_rng(device: torch.device | None = None) -> Iterator[None]:
    """Run a block without affecting the Python / NumPy / torch (CPU, current CUDA device) RNG streams."""
    py, npst, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npst)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _recipe_yaml(recipe: "Recipe") -> str:
    try:
        from codetr.core.config import recipe_to_yaml

        return recipe_to_yaml(recipe)
    except Exception:  # noqa: BLE001 - a hand-built recipe (tests) may not serialise fully
        import yaml

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = json.loads(recipe.model_dump_json(warnings=False, fallback=str))
        return yaml.safe_dump(data, sort_keys=False)


def _default_model_factory(model_cfg: Any) -> nn.Module:
    from codetr.assembly import build_detector

    return build_detector(model_cfg)


def _default_loader_factory(source: Any, split: str, *, train: bool, seed: int, device: torch.device) -> Any:
    from codetr.data.loader import build_loader

    return build_loader(source, split, train=train, seed=seed, pin_memory=device.type == "cuda")


def _target_to_original(batch: Batch, i: int) -> Target:
    """Ground truth of image ``i`` mapped back to the original file's frame.

    Valid for evaluation transforms, which only resize (optionally to a fixed canvas): the scale is
    ``orig_size / image_size`` per axis. ``area`` is already in original pixels.
    """
    t = batch.targets[i]
    h, w = (float(x) for x in batch.image_sizes[i].tolist())
    oh, ow = (float(x) for x in batch.orig_sizes[i].tolist())
    scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=torch.float64)
    boxes = (t.boxes.detach().cpu().double() * scale).float()
    return Target(boxes=boxes, labels=t.labels.cpu(), iscrowd=t.iscrowd.cpu(),
                  area=None if t.area is None else t.area.cpu())


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class _Window:
    """Sums over the current logging window (per rank)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, key: str, value: float) -> None:
        if math.isfinite(value):
            self.sums[key] += value
            self.counts[key] += 1

    def local(self) -> dict[str, tuple[float, int]]:
        return {k: (self.sums[k], self.counts[k]) for k in self.sums}


class _GroupResult:
    """What one accumulation group (one optimizer step) saw."""

    def __init__(self) -> None:
        self.bad = False              # a non-finite loss on some rank: skip the step
        self.stop = False             # SIGTERM on some rank
        self.bad_info: dict[str, Any] | None = None
        self.data_time = 0.0
        self.gt_boxes = 0
        self.all_zero = True          # every loss term exactly 0
        self._no_pos = True           # box terms all exactly 0 / reported num_pos == 0
        self._pos_evidence = False    # a box term or a num_pos entry was seen

    @property
    def no_positive(self) -> bool:
        return self._pos_evidence and self._no_pos

    def observe(self, names: list[str], values: list[float], extra: Mapping[str, torch.Tensor], batch: Batch,
                window: _Window) -> None:
        for k, v in zip(names, values[:-1]):
            window.add(k, v)
            is_box = bool(_BOX_TERM.search(k.rsplit(".", 1)[-1]))
            self._pos_evidence |= is_box
            if v != 0.0:
                self.all_zero = False
                if is_box:
                    self._no_pos = False
        window.add("loss", values[-1])
        for k, v in extra.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                fv = float(v.detach())
                window.add(k, fv)
                if _COUNT_TERM.search(k):
                    self._pos_evidence = True
                    self._no_pos = self._no_pos and fv == 0
        self.gt_boxes += sum(int((~t.iscrowd).sum()) for t in batch.targets)


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Train / evaluate one recipe (every variant goes through here).

    Args:
        recipe: the resolved :class:`~codetr.core.config.schema.Recipe`.
        resume: ``None`` (fresh run), a checkpoint path, or ``"auto"`` (the newest checkpoint of the output
            directory if there is one, else a fresh run). Restores the *full* training state. For
            fine-tuning from other weights use ``model.init_from`` instead (weights only).
        output_dir: overrides ``runtime.output_dir`` (default ``runs/<recipe name>``).
        weights: weights-only load after building (``codetr eval --checkpoint``); shape-aware, reported.
        train: build the training side (train loader, optimizer, schedule). ``False`` for evaluation only.
        model_factory: ``model_cfg -> Detector``; default :func:`codetr.assembly.build_detector`.
        loader_factory: ``(source_cfg, split, *, train, seed, device) -> loader``; default
            :func:`codetr.data.loader.build_loader`. A loader is an iterable of :class:`Batch` with an exact
            ``len()`` per rank; ``set_epoch``, ``state_dict``/``load_state_dict`` and ``info``
            (categories) are used when present.
        console: rich console for the main rank (tests pass one writing to a buffer).
        progress: show the rich progress bar (main rank only).
    """

    def __init__(
        self,
        recipe: "Recipe",
        resume: str | os.PathLike[str] | None = None,
        *,
        output_dir: str | os.PathLike[str] | None = None,
        weights: str | os.PathLike[str] | None = None,
        train: bool = True,
        model_factory: Callable[[Any], nn.Module] | None = None,
        loader_factory: Callable[..., Any] | None = None,
        console: Console | None = None,
        progress: bool = True,
    ):
        self.recipe = recipe
        self.for_training = train
        self.show_progress = progress
        rt = recipe.runtime
        self.dist = du.init_distributed(rt.device)
        self.device = self.dist.device
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        self.console = console if console is not None else Console()
        if not self.is_main:
            self.console = Console(quiet=True)
        # a live bar only on an interactive terminal; log files (Slurm, CI) get one line per log_period
        self.show_progress = progress and self.console.is_terminal
        self.output_dir = Path(output_dir) if output_dir is not None else Path(recipe.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.recipe_yaml = _recipe_yaml(recipe)
        self.recipe_hash = recipe_sha256(self.recipe_yaml)
        self._check_eval_metric()

        # -- precision / determinism -------------------------------------------------------------
        self.precision = rt.precision
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("runtime.precision=bf16 but this GPU has no bfloat16 support "
                             "(fix: runtime.precision=fp16 or fp32)")
        if rt.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                self._say("[yellow]note:[/] runtime.deterministic on CUDA: the backward of grid_sample "
                          "(multi-scale deformable attention) has no deterministic kernel, so MSDA models are "
                          "still not bit-reproducible on GPU (warn_only=True)")

        # -- model (same init on every rank) --------------------------------------------------------
        _seed_all(rt.seed)
        factory = model_factory or _default_model_factory
        model = factory(recipe.model)
        if not hasattr(model, "loss") or not hasattr(model, "predict"):
            raise TypeError(f"model_factory returned {type(model).__name__}, which lacks loss()/predict()")
        self.model = model.to(self.device)
        self.num_classes = getattr(recipe.model, "num_classes", None) or getattr(model, "num_classes", None)

        # -- data -----------------------------------------------------------------------------------
        lf = loader_factory or _default_loader_factory
        self.train_loader = None
        self.val_loader = None
        if train:
            if recipe.data.train is None:
                raise ValueError("the recipe has no data.train section; training needs one")
            self.train_loader = lf(recipe.data.train, "train", train=True, seed=rt.seed, device=self.device)
        if recipe.data.val is not None:
            self.val_loader = lf(recipe.data.val, "val", train=False, seed=rt.seed, device=self.device)

        # -- weights-only initialisation ------------------------------------------------------------
        resume_path = self._resolve_resume(resume) if train else None
        if train and resume_path is None and latest_checkpoint(self.output_dir) is not None:
            self._say(f"[yellow]warning:[/] {self.ckpt_dir} already holds checkpoints of an earlier run; this fresh run "
                      "will overwrite them (use --resume auto to continue it, or another --output-dir)")
        if weights is not None:
            self._load_eval_weights(weights)
        elif recipe.model.init_from is not None and resume_path is None:
            init_from(self.model, recipe.model.init_from, console=self.console, quiet=not self.is_main)

        # -- optimisation ---------------------------------------------------------------------------
        self.iteration = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.bad_steps_total = 0
        self.bad_steps_consecutive = 0
        self.amp_overflows = 0
        self._last_saved_iteration = -1
        self._stop_requested = False
        if train:
            self._build_training()
            if resume_path is not None:
                self._resume(resume_path)
        # training randomness differs per rank (dropout, DN noise); a resumed run restores its saved streams
        if self._pending_rng is None:
            _seed_all(self._reseed if self._reseed is not None else rt.seed + self.rank)

    # ------------------------------------------------------------------ setup
    _pending_rng: Mapping[str, Any] | None = None
    _pending_data_state: Any = None
    _reseed: int | None = None

    def _say(self, msg: Any, **kw: Any) -> None:
        if self.is_main:
            self.console.print(msg, **kw)

    def _check_eval_metric(self) -> None:
        ev = self.recipe.eval
        allowed = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", f"AR{ev.max_dets}", "ARs", "ARm", "ARl"}
        if ev.metric not in allowed:
            raise ValueError(f"eval.metric={ev.metric!r} is not a COCO stat; use one of {', '.join(sorted(allowed))}")

    def _resolve_resume(self, resume: str | os.PathLike[str] | None) -> Path | None:
        """The checkpoint to resume from, decided on rank 0 and shared, so every rank resumes the same one."""
        if resume is None:
            return None
        if str(resume) == "auto":
            found = latest_checkpoint(self.output_dir) if self.is_main else None
            found = du.broadcast_object(None if found is None else str(found))
            if found is None:
                self._say(f"[dim]--resume auto: no checkpoint in {self.ckpt_dir}, starting a fresh run[/]")
                return None
            path = Path(found)
        else:
            path = Path(resume)
        visible = du.all_gather_object(path.is_file())
        if not all(visible):
            if not visible[0]:
                raise FileNotFoundError(f"--resume {path}: no such checkpoint")
            missing = [r for r, ok in enumerate(visible) if not ok]
            raise FileNotFoundError(f"--resume {path}: the checkpoint is not visible on rank(s) {missing}; the output "
                                    "directory must be on a filesystem shared by all nodes")
        return path

    def _load_eval_weights(self, path: str | os.PathLike[str]) -> None:
        obj = load_checkpoint(path)
        report = load_weights(self.model, extract_state_dict(obj), source=str(path))
        if report.missing or report.unexpected or report.skipped_shape or not report.loaded:
            if self.is_main:
                self.console.print(report.table())
            if not report.loaded:
                raise CheckpointError(f"{path}: no tensor matches this model (wrong recipe for this checkpoint?)")
            self._say("[yellow]warning:[/] the checkpoint does not fully match the model (see the table above)")
        else:
            self._say(f"[green]loaded[/] {len(report.loaded)} tensors from {path}")

    def _build_training(self) -> None:
        optim_cfg = self.recipe.optim
        n_batches = len(self.train_loader)
        if n_batches < 1:
            raise ValueError("the training loader yields no batch (empty dataset or batch larger than the data?)")
        self.accumulate = int(optim_cfg.accumulate_steps)
        self.groups_per_epoch = accumulation_groups(n_batches, self.accumulate)
        self.batches_per_epoch = n_batches
        self.iters_per_epoch = len(self.groups_per_epoch)
        self.total_iters = total_iterations(self.recipe.schedule, self.iters_per_epoch)
        self.optimizer, table = build_optimizer(self.model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, self.recipe.schedule, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ddp_model = du.wrap_ddp(_LossModule(self.model), self.device)
        self.stepper = OptimizerStepper(self.ddp_model, self.optimizer, optim_cfg.clip_grad_norm, self.scaler)
        self._say(table)
        self._check_batch_size()

    def _check_batch_size(self) -> None:
        per_rank = getattr(self.train_loader, "batch_size", None) or getattr(self.recipe.data.train, "batch_size", None)
        ref = self.recipe.schedule.reference_batch_size
        self.effective_batch = None if per_rank is None else int(per_rank) * self.world_size * self.accumulate
        unit = "epochs" if self.recipe.schedule.epochs is not None else "iterations"
        length = self.recipe.schedule.epochs or self.recipe.schedule.iterations
        self._say(f"effective batch {self.effective_batch} = {per_rank} per rank x {self.world_size} rank(s) x "
                  f"{self.accumulate} accumulation; {self.iters_per_epoch} iterations/epoch; schedule "
                  + (f"{length} epochs = " if unit == "epochs" else "")
                  + f"{self.total_iters} iterations; precision {self.precision}; device {self.device}")
        if ref is not None and self.effective_batch is not None and self.effective_batch != ref:
            need = ref / (int(per_rank) * self.world_size)
            hint = (f"set optim.accumulate_steps={int(need)} to match it" if need >= 1 and float(need).is_integer()
                    else "match it with data.train.batch_size / more GPUs / optim.accumulate_steps")
            self._say(f"[bold yellow]warning:[/] effective batch {self.effective_batch} differs from the recipe's "
                      f"reference batch {ref}: published AP assumes {ref}; AdamW learning rates do not scale "
                      f"linearly with the batch size, so {hint} rather than rescaling optim.lr")

    # ------------------------------------------------------------------ checkpoint state
    def _data_state(self) -> Any:
        sd = getattr(self.train_loader, "state_dict", None)
        return sd() if callable(sd) else None

    def _build_state(self) -> dict[str, Any] | None:
        """Collective (call on every rank); returns the full state on the main rank, ``None`` elsewhere."""
        rngs = du.all_gather_object(capture_rng_state(self.device))
        datas = du.all_gather_object(self._data_state())
        if not self.is_main:
            return None
        return base_state(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            iteration=self.iteration,
            total_iterations=self.total_iters,
            data={"train": datas},
            rng=rngs,
            world_size=self.world_size,
            recipe=self.recipe_yaml,
            recipe_sha256=self.recipe_hash,
            metrics=self.last_eval,
            best=self.best,
            counters={"bad_steps": self.bad_steps_total, "amp_overflows": self.amp_overflows},
            classes=self._classes(),
            layout=self._layout(),
        )

    def _layout(self) -> dict[str, int]:
        """What the data position depends on; a resumed run with another layout restarts at an epoch start."""
        return {"world_size": self.world_size, "batches_per_epoch": self.batches_per_epoch,
                "accumulate_steps": self.accumulate}

    def _classes(self) -> dict[str, list] | None:
        """Class names and category ids of the data (stored in checkpoints for ``codetr predict``)."""
        for loader in (self.train_loader, self.val_loader):
            info = getattr(loader, "info", None)
            cats = getattr(info, "categories", None)
            if cats:
                cats = [dict(c) if isinstance(c, Mapping) else {"id": c.id, "name": c.name} for c in cats]
                return {"names": [str(c["name"]) for c in cats], "category_ids": [int(c["id"]) for c in cats]}
        return None

    def save(self, best: bool = False) -> Path | None:
        """Write a periodic checkpoint (and ``best.pt`` when ``best``); collective; returns the path on main."""
        state = self._build_state()
        self._last_saved_iteration = self.iteration
        if not self.is_main:
            return None
        path = save_checkpoint(self.ckpt_dir / checkpoint_name(self.iteration), state)
        prune_checkpoints(self.ckpt_dir, self.recipe.runtime.keep_last)
        if best:
            save_checkpoint(self.ckpt_dir / "best.pt", state)
        return path

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        missing = [k for k in ("model", "optimizer", "scheduler", "iteration", "epoch") if k not in state]
        if missing:
            raise CheckpointError(
                f"{path} is not a training checkpoint (missing {', '.join(missing)}): it holds weights only.\n"
                "  fix: to fine-tune from it set model.init_from (weights only); --resume continues a run")
        self.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{path}: the optimizer state does not fit this model/recipe ({exc}).\n"
                "  fix: --resume needs the same model and optim.param_groups; to start a new training from these "
                "weights use model.init_from") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.best = state.get("best")
        self.last_eval = state.get("metrics")
        counters = state.get("counters") or {}
        self.bad_steps_total = int(counters.get("bad_steps", 0))
        self.amp_overflows = int(counters.get("amp_overflows", 0))
        self._last_saved_iteration = self.iteration
        if state.get("recipe_sha256") not in (None, self.recipe_hash):
            self._say("[yellow]warning:[/] the recipe differs from the one the checkpoint was trained with; "
                      "the optimizer, schedule position and data position are restored anyway "
                      "(diff: codetr config show vs the 'recipe' entry of the checkpoint)")
        layout = state.get("layout") or self._layout()
        if self.batch_in_epoch >= int(layout.get("batches_per_epoch", self.batches_per_epoch)):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0  # saved at the end of an epoch
        rngs = state.get("rng") or []
        datas = ((state.get("data") or {}).get("train")) or []
        if layout == self._layout() and len(rngs) == self.world_size:
            self._pending_rng = rngs[self.rank]
            if datas and self.batch_in_epoch:
                self._pending_data_state = datas[self.rank]
        else:
            changed = ", ".join(f"{k} {layout.get(k)} -> {v}" for k, v in self._layout().items() if layout.get(k) != v)
            skip = (f"; the rest of epoch {self.epoch} is skipped (resumed at the start of epoch {self.epoch + 1})"
                    if self.batch_in_epoch else "")
            self._say(f"[yellow]warning:[/] the training layout changed since the checkpoint ({changed}): RNG streams "
                      f"are re-seeded, so the run is no longer bit-reproducible{skip}. The iteration counter and the "
                      "LR schedule continue unchanged")
            if self.batch_in_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._reseed = self.recipe.runtime.seed + self.rank + 1_000_003 * self.iteration
        self._say(f"[green]resumed[/] from {path}: iteration {self.iteration}/{self.total_iters}, epoch {self.epoch}, "
                  f"batch {self.batch_in_epoch}/{self.batches_per_epoch} of the epoch, lr {self._lr():.3g}")
        self._log_json({"type": "resume", "iteration": self.iteration, "epoch": self.epoch, "from": str(path)})

    # ------------------------------------------------------------------ logging
    def _lr(self) -> float:
        for g in self.optimizer.param_groups:
            if g.get("name") == "default":
                return float(g["lr"])
        return float(self.optimizer.param_groups[0]["lr"])

    def _log_json(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def _flush_window(self, window: _Window, epoch: int, eta_s: float) -> dict[str, float]:
        parts = du.all_gather_object(window.local())
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for p in parts:
            for k, (s, c) in p.items():
                sums[k] += s
                counts[k] += c
        means = {k: sums[k] / counts[k] for k in sums if counts[k]}
        window.reset()
        record: dict[str, Any] = {"type": "train", "iteration": self.iteration, "epoch": epoch, "lr": self._lr()}
        record.update({k: round(v, 6) for k, v in sorted(means.items())})
        record.update({"bad_steps": self.bad_steps_total, "eta_s": round(eta_s, 1)})
        if self.precision == "fp16":
            record["loss_scale"] = float(self.scaler.get_scale())
        if self.device.type == "cuda":
            record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        self._log_json(record)
        return means

    # ------------------------------------------------------------------ training
    def _install_sigterm(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):  # noqa: ARG001
            self._stop_requested = True

        try:
            old = signal.signal(signal.SIGTERM, handler)
        except (ValueError, OSError):  # pragma: no cover
            return lambda: None
        return lambda: signal.signal(signal.SIGTERM, old)

    def _forward_losses(self, batch: Batch):
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        try:
            with ctx:
                losses = self.ddp_model(batch)
        except RuntimeError as exc:
            better = du.explain_ddp_error(exc, self.model)  # same parameter order as the DDP wrapper
            if better is not None:
                raise better from exc
            raise
        return sum_losses(losses)

    def _agree(self, bad: bool) -> tuple[bool, bool]:
        """(any rank non-finite, any rank asked to stop) — one tiny collective per micro-batch under DDP."""
        if self.world_size == 1:
            return bad, self._stop_requested
        t = torch.tensor([float(bad), float(self._stop_requested)],
                         device=self.device if self.dist.backend == "nccl" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t[0].item()), bool(t[1].item())

    def _report_bad(self, local: dict[str, Any] | None, step_reason: str) -> None:
        infos = [i for i in du.all_gather_object(local) if i]
        self.bad_steps_total += 1
        self.bad_steps_consecutive += 1
        if not self.is_main:
            return
        if step_reason == "nonfinite_loss":
            desc = "; ".join(f"rank {i['rank']}: {', '.join(i['terms'])} (images {i['image_ids']})" for i in infos)
            msg = f"non-finite loss at iteration {self.iteration}: {desc}"
        else:
            msg = f"non-finite gradient norm at iteration {self.iteration} (losses were finite)"
        self.console.print(f"[bold yellow]warning:[/] {msg}; step skipped "
                           f"({self.bad_steps_consecutive} in a row, {self.bad_steps_total} in total)", highlight=False)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "bad_steps.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"iteration": self.iteration, "epoch": self.epoch, "reason": step_reason,
                                "lr": self._lr(), "ranks": infos}, default=float) + "\n")

    def _diverged(self) -> TrainingError:
        rt, optim_cfg = self.recipe.runtime, self.recipe.optim
        tips = ["lower optim.lr (or add warmup: schedule.warmup_iters)",
                "keep gradient clipping on (optim.clip_grad_norm, e.g. 0.1)"]
        if self.precision == "fp16":
            tips.insert(0, "fp16 overflows easily in DETR losses: use runtime.precision=bf16 (or fp32)")
        tips.append("check the data for degenerate boxes (zero/negative width or height, NaN coordinates): "
                    f"the offending image ids are listed in {self.output_dir / 'bad_steps.jsonl'}")
        return TrainingError(
            f"training diverged: {rt.max_bad_steps} consecutive steps with non-finite losses/gradients "
            f"(iteration {self.iteration}, lr {self._lr():.3g}, precision {self.precision}, "
            f"clip_grad_norm {optim_cfg.clip_grad_norm}).\n  fixes: " + "\n          ".join(tips))

    def _check_degenerate(self, all_zero: bool, no_pos: bool, gt_count: int) -> None:
        patience = self.recipe.runtime.no_positive_patience
        self._zero_streak = self._zero_streak + 1 if all_zero else 0
        self._nopos_streak = self._nopos_streak + 1 if no_pos else 0
        self._streak_gt = self._streak_gt + gt_count if (all_zero or no_pos) else 0
        if not (all_zero or no_pos):
            self._degenerate_warned = False
            return
        if self._degenerate_warned or max(self._zero_streak, self._nopos_streak) < patience:
            return
        self._degenerate_warned = True
        what = "every loss term is exactly zero" if self._zero_streak >= patience else \
            "the box-regression losses are exactly zero (no positive match)"
        if self._streak_gt == 0:
            cause = ("the batches contain no (non-crowd) ground-truth box: empty or filtered annotations "
                     "(all boxes crowd/degenerate, wrong annotation file, category filter)")
        else:
            cause = (f"the batches do contain {self._streak_gt} ground-truth boxes, so targets are not reaching the "
                     "losses: check the class-id mapping (labels must be contiguous 0..num_classes-1 and "
                     f"model.num_classes={self.num_classes} must match the dataset), box format/frame (xyxy pixels), "
                     "and the assigner settings")
        self.console.print(f"[bold yellow]warning:[/] for {patience} iterations {what}. Usual cause: {cause}.",
                           highlight=False)
        self._log_json({"type": "warning", "iteration": self.iteration, "what": what, "cause": cause})

    def _next_batch(self, it: Iterator[Batch]) -> Batch:
        # the torch DataLoader draws its base seed from the global torch RNG when it starts; keep that
        # draw out of the model's RNG stream so resumed runs (which start mid-epoch) match exactly
        with _isolated_rng(None):
            return next(it)

    def _start_epoch(self) -> Iterator[Batch]:
        with _isolated_rng(None):  # starting an epoch must not consume the model's RNG streams either
            return self._start_epoch_impl()

    def _start_epoch_impl(self) -> Iterator[Batch]:
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        if self.batch_in_epoch > 0:
            state = self._pending_data_state
            if state is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(state)
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(self.epoch)
                it = iter(loader)
            else:  # generic loader: skip the consumed batches (slow but exact for deterministic loaders)
                it = iter(loader)
                for _ in range(self.batch_in_epoch):
                    self._next_batch(it)
        else:
            it = iter(loader)
        self._pending_data_state = None
        return it

    def fit(self) -> FitResult:
        """Train to the end of the schedule (or until SIGTERM: checkpoint, then return ``preempted``)."""
        if not self.for_training:
            raise RuntimeError("this Trainer was built with train=False")
        if self.iteration >= self.total_iters:
            self._say(f"[yellow]nothing to do:[/] the checkpoint is already at iteration {self.iteration} of "
                      f"{self.total_iters} (schedule finished). To fine-tune from it, set model.init_from "
                      "instead of --resume; to train longer, increase schedule.epochs/iterations")
            return FitResult(iteration=self.iteration, epoch=self.epoch, status="already_finished",
                             best=self.best, last_eval=self.last_eval)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(self.recipe_yaml, encoding="utf-8")
            self._log_json({"type": "start", "iteration": self.iteration, "total_iterations": self.total_iters,
                            "world_size": self.world_size, "effective_batch": self.effective_batch,
                            "precision": self.precision, "device": str(self.device),
                            "recipe_sha256": self.recipe_hash})
        restore_sigterm = self._install_sigterm()
        try:
            status = self._loop()
        finally:
            restore_sigterm()
        if status == "finished" and self.is_main:
            save_checkpoint(self.ckpt_dir / "model_final.pt",
                            base_state(model=self.model.state_dict(), recipe=self.recipe_yaml,
                                       recipe_sha256=self.recipe_hash, iteration=self.iteration,
                                       metrics=self.last_eval, classes=self._classes()))
            self._say(f"[green]done[/]: {self.iteration} iterations; weights in {self.ckpt_dir / 'model_final.pt'}")
        return FitResult(iteration=self.iteration, epoch=self.epoch, status=status, best=self.best,
                         last_eval=self.last_eval)

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=self.console, transient=False,
                        disable=not (self.is_main and self.show_progress), refresh_per_second=4)

    def _loop(self) -> str:
        rt = self.recipe.runtime
        window = _Window()
        self._zero_streak = self._nopos_streak = self._streak_gt = 0
        self._degenerate_warned = False
        checked_grads = False
        self.model.train()
        t_start, it_start = time.perf_counter(), self.iteration
        with self._progress() as progress:
            task = progress.add_task("train", total=self.total_iters, completed=self.iteration, stats="")
            while self.iteration < self.total_iters:
                epoch_iter = self._start_epoch()
                if self._pending_rng is not None:  # resumed run: continue the saved RNG streams from here
                    restore_rng_state(self._pending_rng, self.device)
                    self._pending_rng = None
                groups = self.groups_per_epoch
                g_index, consumed = 0, 0  # the accumulation group the epoch (re)starts at
                while consumed < self.batch_in_epoch:
                    consumed += groups[g_index]
                    g_index += 1
                if consumed != self.batch_in_epoch:
                    raise CheckpointError("the checkpoint's data position is not at an optimizer-step boundary: "
                                          "resume with the same optim.accumulate_steps and data batch size")
                progress.update(task, description=f"epoch {self.epoch}")
                for size in groups[g_index:]:
                    if self.iteration >= self.total_iters:
                        break
                    t0 = time.perf_counter()
                    group = self._run_group(size, epoch_iter, window)
                    if not group.bad and not checked_grads:
                        checked_grads = True
                        self._check_all_params_have_grads()
                    outcome = self.stepper.step(skip=group.bad)
                    with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
                        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                        self.scheduler.step()  # the LR follows the data, skipped steps included
                    self.iteration += 1
                    if outcome.stepped:
                        self.bad_steps_consecutive = 0
                        if outcome.grad_norm is not None:
                            window.add("grad_norm", outcome.grad_norm)
                        self._check_degenerate(group.all_zero, group.no_positive, group.gt_boxes)
                    elif outcome.reason == "amp_overflow":  # fp16 loss scale too high: the scaler backs off
                        self.amp_overflows += 1
                        self.bad_steps_consecutive += 1
                    else:
                        self._report_bad(group.bad_info, outcome.reason)
                    if self.bad_steps_consecutive >= rt.max_bad_steps:
                        raise self._diverged()
                    window.add("data_time", group.data_time)
                    window.add("step_time", time.perf_counter() - t0)
                    self._log_progress(progress, task, window, t_start, it_start)
                    if self._after_step(group.stop):
                        return "preempted"
                if self.batch_in_epoch >= self.batches_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                close = getattr(epoch_iter, "close", None)
                if callable(close):  # stop loader workers of a partly consumed iterator now
                    close()
        return "finished"

    def _run_group(self, size: int, epoch_iter: Iterator[Batch], window: _Window) -> "_GroupResult":
        """Forward/backward the ``size`` micro-batches of one optimizer step (no optimizer step here)."""
        g = _GroupResult()
        for micro in range(size):
            td = time.perf_counter()
            batch = self._next_batch(epoch_iter).to(self.device, non_blocking=True)
            g.data_time += time.perf_counter() - td
            self.batch_in_epoch += 1
            if g.bad:  # the step is skipped; still consume its batches to keep the data position
                continue
            with self.stepper.sync_context(is_last=micro == size - 1):
                total, terms, extra = self._forward_losses(batch)
                names = list(terms)
                vals = torch.stack([terms[k].detach().float() for k in names] + [total.detach()]).cpu()
                finite = torch.isfinite(vals)
                bad_local = not bool(finite.all())
                bad_any, stop_any = self._agree(bad_local)  # every rank skips together (DDP needs it)
                g.stop = g.stop or stop_any
                if bad_any:
                    g.bad = True
                    if bad_local:
                        g.bad_info = {"rank": self.rank, "image_ids": [int(i) for i in batch.image_ids],
                                      "terms": [n for n, ok in zip(names, finite[:-1].tolist()) if not ok]}
                    continue
                self.stepper.backward(total / size)
            g.observe(names, vals.tolist(), extra, batch, window)
        return g

    def _log_progress(self, progress, task, window: _Window, t_start: float, it_start: int) -> None:
        elapsed = time.perf_counter() - t_start
        speed = (self.iteration - it_start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_iters - self.iteration) / speed if speed > 0 else float("nan")
        if self.is_main and self.show_progress:
            loss_now = window.sums["loss"] / max(window.counts["loss"], 1)
            progress.update(task, completed=self.iteration,
                            stats=f"loss {loss_now:.4f}  lr {self._lr():.2e}  {speed:.2f} it/s")
        if self.iteration % self.recipe.runtime.log_period == 0 or self.iteration == self.total_iters:
            means = self._flush_window(window, self.epoch, eta if math.isfinite(eta) else -1.0)
            if self.is_main and not self.show_progress:
                self.console.print(f"it {self.iteration}/{self.total_iters}  loss {means.get('loss', float('nan')):.4f}  "
                                   f"lr {self._lr():.2e}  {speed:.2f} it/s  eta "
                                   f"{_fmt_time(eta) if math.isfinite(eta) else '?'}", highlight=False)

    def _after_step(self, stop: bool) -> bool:
        """Evaluation and checkpoints due after this optimizer step; True when the run must stop (SIGTERM)."""
        rt, ev = self.recipe.runtime, self.recipe.eval
        epoch_done = self.batch_in_epoch >= self.batches_per_epoch
        finished = self.iteration >= self.total_iters
        run_eval = False
        if self.val_loader is not None:
            if finished:
                run_eval = True
            elif ev.period > 0:
                run_eval = (epoch_done and (self.epoch + 1) % ev.period == 0) if self.recipe.schedule.epochs \
                    else self.iteration % ev.period == 0
        improved = self._periodic_eval() if run_eval else False
        periodic = rt.checkpoint_period > 0 and self.iteration % rt.checkpoint_period == 0
        if ((periodic or epoch_done or finished or stop) and self._last_saved_iteration != self.iteration) or improved:
            self.save(best=improved)
        if stop:
            self._say(f"[yellow]SIGTERM received: checkpoint saved at iteration {self.iteration}; "
                      "resume with --resume auto[/]")
            self._log_json({"type": "preempted", "iteration": self.iteration})
        return stop

    def _check_all_params_have_grads(self) -> None:
        missing = du.unused_parameter_names(self.model)
        counts = du.all_gather_object(missing)
        if any(counts):
            worst = max(range(len(counts)), key=lambda r: len(counts[r]))
            if self.world_size > 1:
                du.raise_unused(counts[worst], worst)
            self._say(f"[yellow]warning:[/] {len(missing)} trainable parameter(s) got no gradient in the first step "
                      f"({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}); multi-GPU (DDP) training "
                      "would fail on them: make their module return a zero-weight loss or freeze them")

    def _periodic_eval(self) -> bool:
        metrics = self.evaluate()
        key = self.recipe.eval.metric
        value = float(self.last_eval.get(key, -1.0)) if self.last_eval else -1.0
        if metrics is None or value < 0:
            return False
        if self.best is None or value > float(self.best["value"]):
            self.best = {"metric": key, "value": value, "iteration": self.iteration, "epoch": self.epoch}
            self._say(f"[green]new best[/] {key} = {value:.4f} at iteration {self.iteration}")
            return True
        return False

    # ------------------------------------------------------------------ evaluation
    def _make_evaluator(self):
        from codetr.evaluation import CocoEvaluator

        info = getattr(self.val_loader, "info", None)
        cats = getattr(info, "categories", None) if info is not None else None
        ev = self.recipe.eval
        if cats:
            categories = [{"id": int(c.id), "name": str(c.name)} if not isinstance(c, Mapping)
                          else {"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats]
            mapping = [c["id"] for c in categories]
        else:
            n = int(self.num_classes or 1)
            mapping = list(range(n))
            categories = [f"class_{i}" for i in range(n)]
        return CocoEvaluator(None, mapping, backend=ev.backend, max_dets=ev.max_dets, categories=categories)

    @torch.no_grad()
    def evaluate(self) -> "CocoMetrics | None":
        """COCO evaluation of the current weights on ``data.val`` (collective: call on every rank).

        Every rank predicts its share (``detector.predict``, not through DDP), results are gathered and
        de-duplicated, the main rank computes and prints the AP and per-class tables; the flat metrics are
        broadcast, logged to ``metrics.jsonl`` and returned (``CocoMetrics`` on every rank).
        """
        from codetr.evaluation import CocoMetrics

        if self.val_loader is None:
            raise ValueError("the recipe has no data.val section; evaluation needs one")
        evaluator = self._make_evaluator()
        was_training = self.model.training
        self.model.eval()
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        n_batches = len(self.val_loader) if hasattr(self.val_loader, "__len__") else None
        t0 = time.perf_counter()
        with _isolated_rng(self.device):
            try:
                for batch in self.val_loader:
                    batch = batch.to(self.device, non_blocking=True)
                    with ctx:
                        dets = self.model.predict(batch)
                    keep = [i for i, image_id in enumerate(batch.image_ids) if int(image_id) >= 0]  # drop padding
                    if not keep:
                        continue
                    ids = [int(batch.image_ids[i]) for i in keep]
                    evaluator.update(ids, [dets[i].to("cpu") for i in keep])
                    sizes_wh = [(int(batch.orig_sizes[i][1]), int(batch.orig_sizes[i][0])) for i in keep]
                    evaluator.add_targets(ids, sizes_wh, [_target_to_original(batch, i) for i in keep])
            finally:
                if was_training:
                    self.model.train()
        evaluator.synchronize()
        flat: dict[str, Any] | None = None
        metrics = None
        if self.is_main:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                metrics = evaluator.compute()
            for w in caught:
                self.console.print(f"[yellow]warning:[/] {w.message}", highlight=False)
            metrics.print(console=self.console, per_class=self.recipe.eval.per_class)
            flat = metrics.as_dict(per_class=False)
        flat = du.broadcast_object(flat)
        if metrics is None and flat is not None:
            stats = [flat[n] for n in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10",
                                       f"AR{flat['max_dets']}", "ARs", "ARm", "ARl")]
            metrics = CocoMetrics.from_stats(stats, max_dets=flat["max_dets"], backend=flat["backend"],
                                             num_images=flat["num_images"], num_detections=flat["num_detections"])
        self.last_eval = flat
        self._log_json({"type": "eval", "iteration": self.iteration, "epoch": self.epoch,
                        "eval_time": round(time.perf_counter() - t0, 2), "num_batches": n_batches,
                        **{f"val/{k}": v for k, v in (flat or {}).items()}})
        final = self.for_training and self.iteration >= getattr(self, "total_iters", 0)
        if final and flat is not None and flat.get("AP", 0) == 0 and flat.get("num_detections", 0) > 0:
            self._say("[yellow]note:[/] final AP is 0 although the model produced detections: for a short run this is "
                      "normal; otherwise check the class-id mapping (model.num_classes vs the dataset categories) "
                      "and that predict() returns boxes in the original image frame")
        return metrics
