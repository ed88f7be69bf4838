"""The training engine shared by every recipe.

=================  ==============================================================================
module             what
=================  ==============================================================================
``trainer``        :class:`Trainer` (``fit`` / ``evaluate``): construction, the loop (accumulation, AMP),
                   periodic eval and checkpoints
``train_state``    what a training checkpoint holds (``build_state``), ``--resume`` (``restore``)
``step_health``    ``StepHealth``: NaN guard (skipped steps, divergence), degenerate-loss warnings
``log_window``     ``metrics.jsonl`` records, logging window, rich progress / plain progress lines
``losses``         the loss-dict contract (``sum_losses``, ``LOSS_KEY``), the training forward
``validation``     COCO evaluation of the detector on ``data.val`` (every rank, gathered)
``data_stream``    epoch start / batch draw isolated from the model's RNG, mid-epoch resume position
``precision``      autocast dtype, ``runtime.deterministic`` settings
``rng``            ``seed_all``, ``isolated_rng``
``factories``      default model (``build_detector``) and loader (``build_loader``) factories
``errors``         ``TrainingError``
``preemption``     stop signals (SIGTERM, SIGUSR1) -> checkpoint + clean stop, ``PREEMPTED_EXIT_CODE`` (75)
``optim``          ``build_optimizer`` (named param groups), ``build_scheduler`` (warmup + steps),
                   ``OptimizerStepper`` (accumulation, clipping, GradScaler)
``distributed``    ``init_distributed`` (torchrun / Slurm env), collectives, device resolution, DDP
``checkpoint``     atomic ``save_checkpoint``, ``load_checkpoint`` (weights_only), ``latest_checkpoint``,
                   ``init_from`` (shape-aware weights-only load with a report)
``predict``        ``predict_images``: JSON + drawn PNG per image
``visualize``      drawing detections / ground truth, ``draw_side_by_side``
=================  ==============================================================================

Submodules are imported lazily (``from codetr.engine import Trainer`` works).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Trainer": "trainer",
    "TrainingError": "errors",
    "build_optimizer": "optim",
    "build_scheduler": "optim",
    "OptimizerStepper": "optim",
    "init_distributed": "distributed",
    "resolve_device": "distributed",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "init_from": "checkpoint",
    "predict_images": "predict",
    "draw_side_by_side": "visualize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'codetr.engine' has no attribute {name!r}")
    value = getattr(import_module(f"codetr.engine.{module}"), name)
    globals()[name] = value
    return value
