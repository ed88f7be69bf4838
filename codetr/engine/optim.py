"""Optimizer (named parameter groups), LR schedule (warmup + steps) and the optimizer-step logic
(gradient accumulation, clipping, AMP scaling) shared by every recipe.

Units: the scheduler counts **optimizer steps** ("iterations"). With ``accumulate_steps = N`` one
iteration consumes N data-loader batches; ``iters_per_epoch`` is the number of optimizer steps in one
epoch (``ceil(batches_per_epoch / N)``), and epoch milestones are converted with it.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

    from codetr.core.config.schema import OptimConfig, ScheduleConfig

__all__ = [
    "ParamGroupInfo",
    "build_param_groups",
    "build_optimizer",
    "groups_table",
    "lr_factor",
    "build_scheduler",
    "total_iterations",
    "accumulation_groups",
    "StepOutcome",
    "OptimizerStepper",
]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- parameter groups
@dataclass
class ParamGroupInfo:
    """One row of the parameter-group table (also stored, minus ``params``, in the optimizer group)."""

    name: str
    lr_mult: float
    weight_decay_mult: float
    lr: float
    weight_decay: float
    param_names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def num_tensors(self) -> int:
        return len(self.params)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


def build_param_groups(model: nn.Module, optim_cfg: "OptimConfig") -> list[ParamGroupInfo]:
    """Split the trainable parameters by the first matching ``optim.param_groups`` rule.

    ``pattern`` is a regular expression *searched* in the dotted parameter name. Frozen parameters
    (``requires_grad=False``) are excluded. Rules that match no trainable parameter are kept (0 tensors)
    so the table shows them, and a warning names them: it is almost always a typo.
    """
    rules = list(optim_cfg.param_groups)
    compiled = []
    for rule in rules:
        try:
            compiled.append(re.compile(rule.pattern))
        except re.error as exc:
            raise ValueError(f"optim.param_groups: invalid regular expression {rule.pattern!r}: {exc}") from None
    groups = [ParamGroupInfo(name=r.pattern, lr_mult=r.lr_mult, weight_decay_mult=r.weight_decay_mult,
                             lr=optim_cfg.lr * r.lr_mult, weight_decay=optim_cfg.weight_decay * r.weight_decay_mult)
              for r in rules]
    default = ParamGroupInfo(name="default", lr_mult=1.0, weight_decay_mult=1.0, lr=optim_cfg.lr,
                             weight_decay=optim_cfg.weight_decay)
    for name, p in _unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        target = default
        for rx, g in zip(compiled, groups):
            if rx.search(name):
                target = g
                break
        target.params.append(p)
        target.param_names.append(name)
    unused = [g.name for g in groups if not g.params]
    if unused:
        warnings.warn(f"optim.param_groups pattern(s) {unused} match no trainable parameter "
                      "(typo, or the module is frozen?)", stacklevel=2)
    return groups + [default]


def groups_table(groups: list[ParamGroupInfo], title: str = "optimizer parameter groups") -> "Table":
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col, just in (("pattern", "left"), ("#tensors", "right"), ("#params", "right"), ("lr", "right"),
                      ("weight decay", "right")):
        t.add_column(col, justify=just)
    for g in groups:
        t.add_row(g.name, str(g.num_tensors), f"{g.num_params:,}", f"{g.lr:.3g}", f"{g.weight_decay:.3g}",
                  style="dim" if not g.params else None)
    total_t = sum(g.num_tensors for g in groups)
    total_p = sum(g.num_params for g in groups)
    t.add_row("[b]total trainable[/]", str(total_t), f"{total_p:,}", "", "")
    return t


def build_optimizer(model: nn.Module, optim_cfg: "OptimConfig") -> tuple[torch.optim.Optimizer, "Table"]:
    """AdamW or SGD over the named parameter groups; returns ``(optimizer, rich table of the groups)``.

    Each optimizer param group carries ``name``, ``lr_mult`` and ``weight_decay_mult`` (saved in the
    optimizer state dict, shown in logs). Empty groups are not given to the optimizer.
    """
    groups = build_param_groups(model, optim_cfg)
    param_groups: list[dict[str, Any]] = [
        {"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name,
         "lr_mult": g.lr_mult, "weight_decay_mult": g.weight_decay_mult}
        for g in groups if g.params
    ]
    if not param_groups:
        raise ValueError("the model has no trainable parameter (everything frozen?)")
    if optim_cfg.type == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(param_groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                                       weight_decay=optim_cfg.weight_decay)
    elif optim_cfg.type == "sgd":
        opt = torch.optim.SGD(param_groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                              weight_decay=optim_cfg.weight_decay)
    else:  # pragma: no cover - the schema only allows the two
        raise ValueError(f"unknown optimizer type {optim_cfg.type!r}")
    return opt, groups_table(groups, title=f"optimizer {optim_cfg.type} — parameter groups")


# --------------------------------------------------------------------------- LR schedule
def total_iterations(schedule_cfg: "ScheduleConfig", iters_per_epoch: int) -> int:
    """Total optimizer steps of the schedule."""
    if schedule_cfg.iterations is not None:
        return int(schedule_cfg.iterations)
    return int(schedule_cfg.epochs) * int(iters_per_epoch)


def milestone_iterations(schedule_cfg: "ScheduleConfig", iters_per_epoch: int) -> list[int]:
    """Milestones in optimizer steps (epoch milestones multiplied by ``iters_per_epoch``)."""
    if schedule_cfg.epochs is not None:
        return [int(m) * int(iters_per_epoch) for m in schedule_cfg.milestones]
    return [int(m) for m in schedule_cfg.milestones]


def lr_factor(step: int, milestones: list[int], gamma: float, warmup_iters: int, warmup_factor: float) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based).

    ``gamma ** (number of milestones <= step)``, times a linear warmup from ``warmup_factor`` to 1 over
    the first ``warmup_iters`` steps (step 0 uses ``warmup_factor``; step ``warmup_iters`` uses 1).
    """
    factor = gamma ** sum(1 for m in milestones if step >= m)
    if warmup_iters > 0 and step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: "ScheduleConfig",
                    iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Step LR at the milestones with optional linear warmup, as a ``LambdaLR`` over optimizer steps.

    Call ``scheduler.step()`` once after every optimizer step (skipped steps included, so the LR follows
    the data). The lambda is a plain closure, so the state dict holds only counters and base LRs and a
    resumed run continues exactly where it stopped.
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch} (empty training loader?)")
    milestones = milestone_iterations(schedule_cfg, iters_per_epoch)
    gamma, warmup_iters, warmup_factor = float(schedule_cfg.gamma), int(schedule_cfg.warmup_iters), float(schedule_cfg.warmup_factor)

    def factor(step: int) -> float:
        return lr_factor(step, milestones, gamma, warmup_iters, warmup_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- accumulation
def accumulation_groups(num_batches: int, accumulate_steps: int) -> list[int]:
    """Sizes of the accumulation groups of one epoch: ``[N, N, ..., remainder]``.

    The last group of an epoch may be smaller; its losses are divided by its own size so every
    optimizer step sees the mean over the batches it accumulated.
    """
    n = int(accumulate_steps)
    full, rest = divmod(int(num_batches), n)
    return [n] * full + ([rest] if rest else [])


@dataclass
class StepOutcome:
    """What happened at an optimizer-step boundary."""

    stepped: bool
    grad_norm: float | None
    reason: str = ""  # "", "nonfinite_loss", "nonfinite_grad", "amp_overflow"


class OptimizerStepper:
    """Backward, accumulation, clipping and the optimizer step, for fp32 / bf16 / fp16.

    Usage per micro-batch ``i`` of an accumulation group of size ``n``::

        with stepper.sync_context(is_last=i == n - 1):
            loss = ...                      # forward inside the context (DDP decides sync at forward)
            stepper.backward(loss / n)
        if i == n - 1:
            outcome = stepper.step(skip=group_had_nonfinite_loss)

    ``sync_context`` enters ``model.no_sync()`` on the non-stepping micro-batches of a DDP model, so
    gradients are all-reduced once per optimizer step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None,
                 scaler: "torch.amp.GradScaler | None" = None):
        self.model = model
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    def sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        if not is_last and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grads_missing(self) -> list[int]:
        """Indices (in optimizer order) of trainable parameters that received no gradient."""
        return [i for i, p in enumerate(self._params) if p.grad is None]

    def step(self, skip: bool = False) -> StepOutcome:
        """Clip and step (or skip and zero the gradients). Always leaves the gradients zeroed."""
        if skip:
            self.zero_grad()
            return StepOutcome(False, None, "nonfinite_loss")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.clip_grad_norm if self.clip_grad_norm is not None else math.inf
        grads = [p for p in self._params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, error_if_nonfinite=False) if grads else torch.zeros(())
        norm_f = float(norm)
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped internally on inf/nan gradients
            self.scaler.update()
            self.zero_grad()
            if not math.isfinite(norm_f) or self.scaler.get_scale() < scale_before:
                return StepOutcome(False, norm_f, "amp_overflow")
            return StepOutcome(True, norm_f)
        if not math.isfinite(norm_f):
            self.zero_grad()
            return StepOutcome(False, norm_f, "nonfinite_grad")
        self.optimizer.step()
        self.zero_grad()
        return StepOutcome(True, norm_f)

    def iter_params(self) -> Iterator[nn.Parameter]:
        return iter(self._params)

