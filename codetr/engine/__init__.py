"""The training engine shared by every recipe.

=================  ==============================================================================
module             what
=================  ==============================================================================
``trainer``        :class:`Trainer` (``fit`` / ``evaluate``): loop, AMP, accumulation, NaN guard,
                   logging (rich progress + ``metrics.jsonl``), periodic eval, checkpoints, resume
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
    "TrainingError": "trainer",
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
