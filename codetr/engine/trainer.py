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
  :mod:`codetr.data`; the torch RNG draw a ``DataLoader`` makes when it starts is isolated, see
  :mod:`codetr.engine.data_stream`), and evaluation runs under a forked RNG, so evaluating or resuming does
  not change the training trajectory;
* a checkpoint stores model, optimizer, scheduler, scaler, epoch/iteration, the data-stream position and
  every rank's RNG states (:mod:`codetr.engine.train_state`); ``--resume`` restores all of it, so N steps +
  resume + N steps equals 2N uninterrupted steps bit for bit on CPU (tested).

This module holds the construction and the loop; its collaborators: :mod:`~codetr.engine.losses` (loss
dict contract, forward), :mod:`~codetr.engine.step_health` (skipped steps, divergence, degenerate
losses), :mod:`~codetr.engine.log_window` (``metrics.jsonl``, progress), :mod:`~codetr.engine.validation`
(COCO evaluation), :mod:`~codetr.engine.precision`, :mod:`~codetr.engine.rng`, :mod:`~codetr.engine.factories`.

Notes: ``runtime.deterministic`` calls ``torch.use_deterministic_algorithms(True, warn_only=True)``;
on CUDA the backward of ``grid_sample`` (pure-PyTorch multi-scale deformable attention) has no
deterministic implementation, so CUDA runs of MSDA models are not bit-reproducible even then.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from rich.console import Console
from torch import nn

from codetr.core.structures import Batch
from codetr.engine import distributed as du
from codetr.engine import factories
from codetr.engine import train_state
from codetr.engine.checkpoint import (
    checkpoint_name,
    init_from,
    prune_checkpoints,
    recipe_sha256,
    restore_rng_state,
    save_checkpoint,
)
from codetr.engine.data_stream import first_group, next_batch, start_epoch
from codetr.engine.ema import ModelEMA
from codetr.engine.log_window import LoopProgress, MetricsLog, Window
from codetr.engine.losses import LossModule, forward_losses
from codetr.engine.optim import (
    OptimizerStepper,
    accumulation_groups,
    build_optimizer,
    build_scheduler,
    total_iterations,
)
from codetr.engine.precision import amp_dtype, configure_determinism
from codetr.engine.preemption import install_stop_handlers
from codetr.engine.rng import seed_all
from codetr.engine.run_dir import claim_output_dir, ensure_output_dir
from codetr.engine.step_health import GroupResult, StepHealth
from codetr.engine.validation import evaluate_detector, make_evaluator

if TYPE_CHECKING:  # pragma: no cover
    from codetr.core.config.schema import Recipe
    from codetr.evaluation import CocoMetrics

__all__ = ["Trainer", "FitResult"]


class FitResult(dict):
    """What :meth:`Trainer.fit` returns: ``iteration``, ``epoch``, ``status`` ("finished" | "preempted" |
    "already_finished"), ``best`` (metric, value, iteration) and ``last_eval`` (flat metrics)."""


class Trainer:
    """Train / evaluate one recipe (every variant goes through here).

    Args:
        recipe: the resolved :class:`~codetr.core.config.schema.Recipe`.
        resume: ``None`` (fresh run), a checkpoint path, or ``"auto"`` (the newest checkpoint of the output
            directory if there is one, else a fresh run). Restores the *full* training state. For
            fine-tuning from other weights use ``model.init_from`` instead (weights only).
        output_dir: overrides ``runtime.output_dir`` (default ``runs/<recipe name>``).
        overwrite: a fresh run into an output dir that holds an earlier run moves the earlier files aside
            (:mod:`codetr.engine.run_dir`); without it (and without ``resume``) such a run is refused.
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
        overwrite: bool = False,
    ):
        self.recipe = recipe
        self.for_training = train
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
        self.log = MetricsLog(self.metrics_path, enabled=self.is_main)
        self.recipe_yaml = train_state.recipe_yaml(recipe)
        self.recipe_hash = recipe_sha256(self.recipe_yaml)
        self._check_eval_metric()

        # -- precision / determinism -------------------------------------------------------------
        self.precision = rt.precision
        self.amp_dtype = amp_dtype(self.precision, self.device)
        if rt.deterministic:
            configure_determinism(self.device, self.say)

        # -- model (same init on every rank) --------------------------------------------------------
        seed_all(rt.seed)
        model = (model_factory or factories.default_model_factory)(recipe.model)
        if not hasattr(model, "loss") or not hasattr(model, "predict"):
            raise TypeError(f"model_factory returned {type(model).__name__}, which lacks loss()/predict()")
        self.model = model.to(self.device)
        self.num_classes = getattr(recipe.model, "num_classes", None) or getattr(model, "num_classes", None)

        # -- data -----------------------------------------------------------------------------------
        lf = loader_factory or factories.default_loader_factory
        self.train_loader = None
        self.val_loader = None
        if train:
            if recipe.data.train is None:
                raise ValueError("the recipe has no data.train section; training needs one")
            self.train_loader = lf(recipe.data.train, "train", train=True, seed=rt.seed, device=self.device)
        if recipe.data.val is not None:
            self.val_loader = lf(recipe.data.val, "val", train=False, seed=rt.seed, device=self.device)

        # -- weights-only initialisation ------------------------------------------------------------
        resume_path = (train_state.resolve_resume(resume, self.output_dir, is_main=self.is_main, say=self.say)
                       if train else None)
        if train:
            ensure_output_dir(self.output_dir, is_main=self.is_main)
        if train and resume_path is None:  # a fresh run never writes over an earlier one unasked
            claim_output_dir(self.output_dir, resume_auto=str(resume) == "auto", overwrite=overwrite,
                             is_main=self.is_main, say=self.say)
        if weights is not None:
            train_state.load_eval_weights(self.model, weights, console=self.console, is_main=self.is_main,
                                          say=self.say)
        elif recipe.model.init_from is not None and resume_path is None:
            init_from(self.model, recipe.model.init_from, console=self.console, quiet=not self.is_main)

        # -- optimisation ---------------------------------------------------------------------------
        self.iteration = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.health = StepHealth(recipe, self.dist, self.console, self.log, self.output_dir, self.num_classes)
        self.pending = train_state.PendingResume()
        self.ema: ModelEMA | None = None  # set by _build_training when model.ema is configured
        self._last_saved_iteration = -1
        self._stop_requested = False  # set by the SIGTERM handler during fit()
        if train:
            self._build_training()
            if resume_path is not None:
                train_state.restore(self, resume_path)
                self._last_saved_iteration = self.iteration
        # training randomness differs per rank (dropout, DN noise); a resumed run restores its saved streams
        if self.pending.rng is None:
            seed_all(self.pending.reseed if self.pending.reseed is not None else rt.seed + self.rank)

    # ------------------------------------------------------------------ setup
    @property
    def bad_steps_total(self) -> int:
        """Steps skipped for non-finite losses / gradients over the run (see :class:`StepHealth`)."""
        return self.health.bad_steps_total

    @property
    def amp_overflows(self) -> int:
        """fp16 steps skipped by the GradScaler over the run."""
        return self.health.amp_overflows

    def say(self, msg: Any, **kw: Any) -> None:
        """Print on the main rank's console."""
        if self.is_main:
            self.console.print(msg, **kw)

    def lr(self) -> float:
        """The learning rate reported in logs: that of the ``default`` param group (else the first one)."""
        for g in self.optimizer.param_groups:
            if g.get("name") == "default":
                return float(g["lr"])
        return float(self.optimizer.param_groups[0]["lr"])

    def _check_eval_metric(self) -> None:
        ev = self.recipe.eval
        allowed = {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", f"AR{ev.max_dets}", "ARs", "ARm", "ARl"}
        if ev.metric not in allowed:
            raise ValueError(f"eval.metric={ev.metric!r} is not a COCO stat; use one of {', '.join(sorted(allowed))}")

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
        self.ddp_model = du.wrap_ddp(LossModule(self.model), self.device)
        self.stepper = OptimizerStepper(self.ddp_model, self.optimizer, optim_cfg.clip_grad_norm, self.scaler)
        ema = self.recipe.model.ema
        self.ema = ModelEMA(self.model, ema.decay, ema.warmup) if ema is not None else None
        self.say(table)
        self._check_batch_size()

    def _check_batch_size(self) -> None:
        per_rank = getattr(self.train_loader, "batch_size", None) or getattr(self.recipe.data.train, "batch_size", None)
        ref = self.recipe.schedule.reference_batch_size
        self.effective_batch = None if per_rank is None else int(per_rank) * self.world_size * self.accumulate
        unit = "epochs" if self.recipe.schedule.epochs is not None else "iterations"
        length = self.recipe.schedule.epochs or self.recipe.schedule.iterations
        self.say(f"effective batch {self.effective_batch} = {per_rank} per rank x {self.world_size} rank(s) x "
                 f"{self.accumulate} accumulation; {self.iters_per_epoch} iterations/epoch; schedule "
                 + (f"{length} epochs = " if unit == "epochs" else "")
                 + f"{self.total_iters} iterations; precision {self.precision}; device {self.device}")
        if ref is not None and self.effective_batch is not None and self.effective_batch != ref:
            need = ref / (int(per_rank) * self.world_size)
            hint = (f"set optim.accumulate_steps={int(need)} to match it" if need >= 1 and float(need).is_integer()
                    else "match it with data.train.batch_size / more GPUs / optim.accumulate_steps")
            self.say(f"[bold yellow]warning:[/] effective batch {self.effective_batch} differs from the recipe's "
                     f"reference batch {ref}: published AP assumes {ref}; AdamW learning rates do not scale "
                     f"linearly with the batch size, so {hint} rather than rescaling optim.lr")

    # ------------------------------------------------------------------ checkpoints
    def save(self, best: bool = False) -> Path | None:
        """Write a periodic checkpoint (and ``best.pt`` when ``best``); collective; returns the path on main."""
        state = train_state.build_state(self)
        self._last_saved_iteration = self.iteration
        if not self.is_main:
            return None
        path = save_checkpoint(self.ckpt_dir / checkpoint_name(self.iteration), state)
        prune_checkpoints(self.ckpt_dir, self.recipe.runtime.keep_last)
        if best:
            save_checkpoint(self.ckpt_dir / "best.pt", state)
        return path

    # ------------------------------------------------------------------ training
    def fit(self) -> FitResult:
        """Train to the end of the schedule (or until SIGTERM: checkpoint, then return ``preempted``)."""
        if not self.for_training:
            raise RuntimeError("this Trainer was built with train=False")
        if self.iteration >= self.total_iters:
            self.say(f"[yellow]nothing to do:[/] the checkpoint is already at iteration {self.iteration} of "
                     f"{self.total_iters} (schedule finished). To fine-tune from it, set model.init_from "
                     "instead of --resume; to train longer, increase schedule.epochs/iterations")
            return FitResult(iteration=self.iteration, epoch=self.epoch, status="already_finished",
                             best=self.best, last_eval=self.last_eval)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(self.recipe_yaml, encoding="utf-8")
            self.log.drop_after(self.iteration)  # resumed: the iterations after the checkpoint are replayed
            self.log.write({"type": "start", "iteration": self.iteration, "total_iterations": self.total_iters,
                            "world_size": self.world_size, "effective_batch": self.effective_batch,
                            "precision": self.precision, "device": str(self.device),
                            "recipe_sha256": self.recipe_hash})
        restore_sigterm = self._install_sigterm()
        try:
            status = self._loop()
        finally:
            restore_sigterm()
        if status == "finished" and self.is_main:
            save_checkpoint(self.ckpt_dir / "model_final.pt", train_state.final_state(self))
            self.say(f"[green]done[/]: {self.iteration} iterations; weights in {self.ckpt_dir / 'model_final.pt'}")
        return FitResult(iteration=self.iteration, epoch=self.epoch, status=status, best=self.best,
                         last_eval=self.last_eval)

    def _loop(self) -> str:
        """Run optimizer steps until the schedule ends ("finished") or SIGTERM ("preempted")."""
        window = Window()
        self.health.start_loop()
        self.model.train()
        with LoopProgress(self.console, self.log, is_main=self.is_main, show_bar=self.show_progress,
                          total_iters=self.total_iters, start_iteration=self.iteration,
                          log_period=self.recipe.runtime.log_period) as progress:
            while self.iteration < self.total_iters:
                epoch_iter = start_epoch(self.train_loader, self.epoch, self.batch_in_epoch, self.pending.data_state)
                self.pending.data_state = None
                if self.pending.rng is not None:  # resumed run: continue the saved RNG streams from here
                    restore_rng_state(self.pending.rng, self.device)
                    self.pending.rng = None
                groups = self.groups_per_epoch[first_group(self.groups_per_epoch, self.batch_in_epoch):]
                progress.start_epoch(self.epoch)
                for size in groups:
                    if self.iteration >= self.total_iters:
                        break
                    if self._train_step(size, epoch_iter, window, progress):
                        return "preempted"
                self._report_skipped()
                if self.batch_in_epoch >= self.batches_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                close = getattr(epoch_iter, "close", None)
                if callable(close):  # stop loader workers of a partly consumed iterator now
                    close()
        return "finished"

    def _report_skipped(self) -> None:
        """Corrupt samples this rank's train loader skipped in the epoch (``loader.skip_report()``): one
        console line and a ``skipped_samples`` record in ``metrics.jsonl``; silent when none were."""
        report = getattr(self.train_loader, "skip_report", None)
        r = report() if callable(report) else None
        if not r:
            return
        from rich.markup import escape

        self.say(f"[yellow]data:[/] {escape(r.message())}")
        self.log.write({"type": "skipped_samples", "iteration": self.iteration, "epoch": r.epoch,
                        "count": r.count, "total": r.total, "examples": list(r.examples)})

    def _train_step(self, size: int, epoch_iter: Iterator[Batch], window: Window, progress: LoopProgress) -> bool:
        """One optimizer step over ``size`` micro-batches, then logging, evaluation and checkpoints due;
        True when the run must stop (SIGTERM)."""
        t0 = time.perf_counter()
        group = self._run_group(size, epoch_iter, window)
        if not group.bad:
            self.health.check_grads_once(self.model)
        outcome = self.stepper.step(skip=group.bad)
        if outcome.stepped and self.ema is not None:
            self.ema.update(self.model)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()  # the LR follows the data, skipped steps included
        self.iteration += 1
        lr = self.lr()
        if outcome.stepped and outcome.grad_norm is not None:
            window.add("grad_norm", outcome.grad_norm)
        self.health.after_step(outcome, group, iteration=self.iteration, epoch=self.epoch, lr=lr)
        window.add("data_time", group.data_time)
        window.add("step_time", time.perf_counter() - t0)
        progress.step(window, iteration=self.iteration, epoch=self.epoch, lr=lr,
                      bad_steps=self.health.bad_steps_total, extra=self._record_extras)
        return self._after_step(group.stop)

    def _run_group(self, size: int, epoch_iter: Iterator[Batch], window: Window) -> GroupResult:
        """Forward/backward the ``size`` micro-batches of one optimizer step (no optimizer step here)."""
        g = GroupResult()
        for micro in range(size):
            td = time.perf_counter()
            batch = next_batch(epoch_iter).to(self.device, non_blocking=True)
            g.data_time += time.perf_counter() - td
            self.batch_in_epoch += 1
            if g.bad:  # the step is skipped; still consume its batches to keep the data position
                continue
            with self.stepper.sync_context(is_last=micro == size - 1):
                total, terms, extra = forward_losses(self.ddp_model, self.model, batch, self.device, self.amp_dtype)
                names = list(terms)
                vals = torch.stack([terms[k].detach().float() for k in names] + [total.detach()]).cpu()
                finite = torch.isfinite(vals)
                bad_local = not bool(finite.all())
                bad_any, stop_any = self.health.agree(bad_local, self._stop_requested)  # every rank skips together
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

    def _record_extras(self) -> dict[str, Any]:
        """Extra fields of a ``train`` record: fp16 loss scale, CUDA peak memory."""
        fields: dict[str, Any] = {}
        if self.precision == "fp16":
            fields["loss_scale"] = float(self.scaler.get_scale())
        if self.device.type == "cuda":
            fields["max_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return fields

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
            self.say(f"[yellow]stop signal (SIGTERM / SIGUSR1) received: checkpoint saved at iteration "
                     f"{self.iteration}; resume with --resume auto[/]")
            self.log.write({"type": "preempted", "iteration": self.iteration})
        return stop

    def _install_sigterm(self) -> Callable[[], None]:
        """Stop signals (SIGTERM, SIGUSR1: :mod:`codetr.engine.preemption`) request a checkpoint and a clean stop;
        every rank agrees on it at the next step. Returns the function restoring the previous handlers."""
        return install_stop_handlers(lambda: setattr(self, "_stop_requested", True))

    # ------------------------------------------------------------------ evaluation
    def _periodic_eval(self) -> bool:
        """Evaluate; True (and ``best`` updated) when ``eval.metric`` improved."""
        metrics = self.evaluate()
        key = self.recipe.eval.metric
        value = float(self.last_eval.get(key, -1.0)) if self.last_eval else -1.0
        if metrics is None or value < 0:
            return False
        if self.best is None or value > float(self.best["value"]):
            self.best = {"metric": key, "value": value, "iteration": self.iteration, "epoch": self.epoch}
            self.say(f"[green]new best[/] {key} = {value:.4f} at iteration {self.iteration}")
            return True
        return False

    @torch.no_grad()
    def evaluate(self) -> "CocoMetrics | None":
        """COCO evaluation of the current weights on ``data.val`` (collective: call on every rank).

        Every rank predicts its share (``detector.predict``, not through DDP), results are gathered and
        de-duplicated, the main rank computes and prints the AP and per-class tables; the flat metrics are
        broadcast, logged to ``metrics.jsonl`` and returned (``CocoMetrics`` on every rank).
        """
        if self.val_loader is None:
            raise ValueError("the recipe has no data.val section; evaluation needs one")
        evaluator = make_evaluator(self.val_loader, self.recipe.eval, self.num_classes)
        n_batches = len(self.val_loader) if hasattr(self.val_loader, "__len__") else None
        t0 = time.perf_counter()
        model = self.ema.module if self.ema is not None else self.model  # EMA runs evaluate the EMA weights
        metrics, flat = evaluate_detector(model, self.val_loader, evaluator, device=self.device,
                                          dtype=self.amp_dtype, console=self.console, is_main=self.is_main,
                                          per_class=self.recipe.eval.per_class)
        self.last_eval = flat
        self.log.write({"type": "eval", "iteration": self.iteration, "epoch": self.epoch,
                        "eval_time": round(time.perf_counter() - t0, 2), "num_batches": n_batches,
                        **{f"val/{k}": v for k, v in (flat or {}).items()}})
        final = self.for_training and self.iteration >= getattr(self, "total_iters", 0)
        if final and flat is not None and flat.get("AP", 0) == 0 and flat.get("num_detections", 0) > 0:
            self.say("[yellow]note:[/] final AP is 0 although the model produced detections: for a short run this is "
                     "normal; otherwise check the class-id mapping (model.num_classes vs the dataset categories) "
                     "and that predict() returns boxes in the original image frame")
        return metrics
