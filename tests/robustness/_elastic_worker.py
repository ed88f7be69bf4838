"""A ``codetr train`` worker for the elastic-restart test: on torchrun's first attempt (restart count 0) the rank
named by ``CODETR_TEST_KILL_RANK`` kills itself with SIGKILL right after optimizer step ``CODETR_TEST_KILL_AT``;
otherwise it is exactly ``codetr train`` (``python -m codetr.cli.main train ...``)."""

from __future__ import annotations

import os
import signal

from codetr.cli.main import app
from codetr.engine.trainer import Trainer

_after_step = Trainer._after_step


def _after_step_or_die(self, stop):
    out = _after_step(self, stop)
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            and self.rank == int(os.environ["CODETR_TEST_KILL_RANK"])
            and self.iteration == int(os.environ["CODETR_TEST_KILL_AT"])):
        os.kill(os.getpid(), signal.SIGKILL)
    return out


Trainer._after_step = _after_step_or_die

if __name__ == "__main__":
    app()
