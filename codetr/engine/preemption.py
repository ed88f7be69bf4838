"""Stop signals: a scheduler's request to checkpoint and stop (preemption, time limits).

SIGTERM (torchrun, Kubernetes, most schedulers) and SIGUSR1 (SLURM ``#SBATCH --signal=USR1@<seconds>``, sent that
long before the time limit) make :class:`~codetr.engine.trainer.Trainer` finish its current optimizer step, agree
with every rank on stopping, save a checkpoint and return ``"preempted"``; ``codetr train`` then exits with
:data:`PREEMPTED_EXIT_CODE` so a job script can requeue itself, and ``--resume auto`` continues exactly
(docs/multi_node.md).
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

__all__ = ["STOP_SIGNALS", "PREEMPTED_EXIT_CODE", "install_stop_handlers"]

#: signals that request a checkpoint and a clean stop
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)
#: exit status of ``codetr train`` after a stop signal (``EX_TEMPFAIL``: "try again", i.e. requeue + resume)
PREEMPTED_EXIT_CODE = 75


def install_stop_handlers(on_stop: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_stop()`` when a :data:`STOP_SIGNALS` signal arrives; returns the function restoring the previous
    handlers. A no-op outside the main thread (Python delivers signals only there)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):  # noqa: ARG001
        on_stop()

    old = {}
    for sig in STOP_SIGNALS:
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # pragma: no cover - platform without the signal
            continue

    def restore() -> None:
        for sig, prev in old.items():
            signal.signal(sig, prev)

    return restore
