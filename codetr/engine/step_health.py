"""Health checks of every optimizer step: non-finite losses/gradients, divergence and degenerate losses.

* A non-finite loss term on any rank skips the whole step on every rank (:meth:`StepHealth.agree` is the
  per-micro-batch collective that makes the ranks decide together). Each skipped step is reported on the
  console and in ``<output_dir>/bad_steps.jsonl`` (rank, image ids, terms); ``runtime.max_bad_steps``
  consecutive skipped steps (fp16 loss-scale overflows included) raise :class:`TrainingError` with fixes.
* The loop's first taken step checks that every trainable parameter got a gradient (DDP needs it).
* ``runtime.no_positive_patience`` consecutive steps in which every loss term is exactly zero, or the box
  terms are zero / ``num_pos`` is 0 (no positive match), give one warning with the likely cause (console
  and a ``warning`` record in ``metrics.jsonl``), repeated only after a healthy step.

:class:`GroupResult` collects what one accumulation group saw; :class:`StepHealth` owns the counters and
streaks across steps (the counters are checkpointed by :mod:`codetr.engine.train_state`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from rich.console import Console
from torch import nn

from codetr.core.structures import Batch
from codetr.engine import distributed as du
from codetr.engine.errors import TrainingError
from codetr.engine.log_window import MetricsLog, Window

if TYPE_CHECKING:  # pragma: no cover
    from codetr.core.config.schema import Recipe
    from codetr.engine.optim import StepOutcome

__all__ = ["GroupResult", "StepHealth"]

_BOX_TERM = re.compile(r"bbox|box|giou|iou|l1|center|reg", re.IGNORECASE)
_COUNT_TERM = re.compile(r"(^|\.)num_pos(itives)?$")


class GroupResult:
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
                window: Window) -> None:
        """One finite micro-batch: ``values`` are the terms ``names`` followed by the total."""
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


class StepHealth:
    """Step-health state of one training run and the checks that update it.

    Args:
        recipe: the run's recipe (``runtime.max_bad_steps``, ``runtime.no_positive_patience``,
            ``runtime.precision`` and ``optim.clip_grad_norm`` for the diagnosis).
        dist: this process' :class:`~codetr.engine.distributed.DistInfo`.
        console: the run's console (quiet on non-main ranks).
        log: the run's ``metrics.jsonl``.
        output_dir: where ``bad_steps.jsonl`` is written.
        num_classes: ``model.num_classes`` (quoted in the degenerate-loss diagnosis).
    """

    def __init__(self, recipe: "Recipe", dist: du.DistInfo, console: Console, log: MetricsLog, output_dir: Path,
                 num_classes: int | None):
        self.recipe = recipe
        self.dist = dist
        self.is_main = dist.rank == 0
        self.console = console
        self.log = log
        self.output_dir = output_dir
        self.num_classes = num_classes

        self.bad_steps_total = 0
        """Skipped steps over the run (non-finite loss or gradient); checkpointed (``counters.bad_steps``)."""
        self.bad_steps_consecutive = 0
        """Skipped steps since the last taken one (fp16 overflows included); divergence at ``max_bad_steps``."""
        self.amp_overflows = 0
        """fp16 steps skipped by the GradScaler (loss scale too high); checkpointed (``counters.amp_overflows``)."""
        self.zero_streak = 0
        """Consecutive taken steps in which every loss term was exactly zero."""
        self.nopos_streak = 0
        """Consecutive taken steps without a positive match (box terms zero / ``num_pos`` 0)."""
        self.streak_gt = 0
        """Non-crowd ground-truth boxes seen during the current degenerate streak."""
        self.degenerate_warned = False
        """The current degenerate streak was already reported (reset by a healthy step)."""
        self.grads_checked = False
        """The loop's first non-skipped step was checked for parameters without a gradient."""

    def start_loop(self) -> None:
        """Forget the per-loop state (degenerate-loss streaks, gradient check) at the start of a training
        loop; the counters are kept."""
        self.zero_streak = self.nopos_streak = self.streak_gt = 0
        self.degenerate_warned = False
        self.grads_checked = False

    def check_grads_once(self, model: nn.Module) -> None:
        """After the loop's first non-skipped backward (collective): parameters without a gradient are a
        warning on one rank and an error under DDP (which would fail on them)."""
        if self.grads_checked:
            return
        self.grads_checked = True
        missing = du.unused_parameter_names(model)
        counts = du.all_gather_object(missing)
        if any(counts):
            worst = max(range(len(counts)), key=lambda r: len(counts[r]))
            if self.dist.world_size > 1:
                du.raise_unused(counts[worst], worst)
            if self.is_main:
                self.console.print(
                    f"[yellow]warning:[/] {len(missing)} trainable parameter(s) got no gradient in the first step "
                    f"({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}); multi-GPU (DDP) training "
                    "would fail on them: make their module return a zero-weight loss or freeze them")

    def agree(self, bad: bool, stop: bool) -> tuple[bool, bool]:
        """(any rank non-finite, any rank asked to stop) — one tiny collective per micro-batch under DDP."""
        if self.dist.world_size == 1:
            return bad, stop
        t = torch.tensor([float(bad), float(stop)],
                         device=self.dist.device if self.dist.backend == "nccl" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t[0].item()), bool(t[1].item())

    def after_step(self, outcome: "StepOutcome", group: GroupResult, *, iteration: int, epoch: int,
                   lr: float) -> None:
        """Account for optimizer step ``iteration`` (collective when it was skipped for a non-finite value);
        raises :class:`TrainingError` once ``runtime.max_bad_steps`` steps in a row were skipped."""
        if outcome.stepped:
            self.bad_steps_consecutive = 0
            self.check_degenerate(group.all_zero, group.no_positive, group.gt_boxes, iteration=iteration)
        elif outcome.reason == "amp_overflow":  # fp16 loss scale too high: the scaler backs off
            self.amp_overflows += 1
            self.bad_steps_consecutive += 1
        else:
            self.report_bad(group.bad_info, outcome.reason, iteration=iteration, epoch=epoch, lr=lr)
        if self.bad_steps_consecutive >= self.recipe.runtime.max_bad_steps:
            raise self.diverged(iteration=iteration, lr=lr)

    def report_bad(self, local: dict[str, Any] | None, step_reason: str, *, iteration: int, epoch: int,
                   lr: float) -> None:
        """Count a skipped step and report it (collective: gathers every rank's ``local`` details)."""
        infos = [i for i in du.all_gather_object(local) if i]
        self.bad_steps_total += 1
        self.bad_steps_consecutive += 1
        if not self.is_main:
            return
        if step_reason == "nonfinite_loss":
            desc = "; ".join(f"rank {i['rank']}: {', '.join(i['terms'])} (images {i['image_ids']})" for i in infos)
            msg = f"non-finite loss at iteration {iteration}: {desc}"
        else:
            msg = f"non-finite gradient norm at iteration {iteration} (losses were finite)"
        self.console.print(f"[bold yellow]warning:[/] {msg}; step skipped "
                           f"({self.bad_steps_consecutive} in a row, {self.bad_steps_total} in total)", highlight=False)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "bad_steps.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"iteration": iteration, "epoch": epoch, "reason": step_reason,
                                "lr": lr, "ranks": infos}, default=float) + "\n")

    def diverged(self, *, iteration: int, lr: float) -> TrainingError:
        """The error (with fixes) for ``runtime.max_bad_steps`` consecutive skipped steps."""
        rt, optim_cfg = self.recipe.runtime, self.recipe.optim
        precision = rt.precision
        tips = ["lower optim.lr (or add warmup: schedule.warmup_iters)",
                "keep gradient clipping on (optim.clip_grad_norm, e.g. 0.1)"]
        if precision == "fp16":
            tips.insert(0, "fp16 overflows easily in DETR losses: use runtime.precision=bf16 (or fp32)")
        tips.append("check the data for degenerate boxes (zero/negative width or height, NaN coordinates): "
                    f"the offending image ids are listed in {self.output_dir / 'bad_steps.jsonl'}")
        return TrainingError(
            f"training diverged: {rt.max_bad_steps} consecutive steps with non-finite losses/gradients "
            f"(iteration {iteration}, lr {lr:.3g}, precision {precision}, "
            f"clip_grad_norm {optim_cfg.clip_grad_norm}).\n  fixes: " + "\n          ".join(tips))

    def check_degenerate(self, all_zero: bool, no_pos: bool, gt_count: int, *, iteration: int) -> None:
        """Update the degenerate-loss streaks with one taken step; warn once when one reaches the patience."""
        patience = self.recipe.runtime.no_positive_patience
        self.zero_streak = self.zero_streak + 1 if all_zero else 0
        self.nopos_streak = self.nopos_streak + 1 if no_pos else 0
        self.streak_gt = self.streak_gt + gt_count if (all_zero or no_pos) else 0
        if not (all_zero or no_pos):
            self.degenerate_warned = False
            return
        if self.degenerate_warned or max(self.zero_streak, self.nopos_streak) < patience:
            return
        self.degenerate_warned = True
        what = "every loss term is exactly zero" if self.zero_streak >= patience else \
            "the box-regression losses are exactly zero (no positive match)"
        if self.streak_gt == 0:
            cause = ("the batches contain no (non-crowd) ground-truth box: empty or filtered annotations "
                     "(all boxes crowd/degenerate, wrong annotation file, category filter)")
        else:
            cause = (f"the batches do contain {self.streak_gt} ground-truth boxes, so targets are not reaching the "
                     "losses: check the class-id mapping (labels must be contiguous 0..num_classes-1 and "
                     f"model.num_classes={self.num_classes} must match the dataset), box format/frame (xyxy pixels), "
                     "and the assigner settings")
        self.console.print(f"[bold yellow]warning:[/] for {patience} iterations {what}. Usual cause: {cause}.",
                           highlight=False)
        self.log.write({"type": "warning", "iteration": iteration, "what": what, "cause": cause})
