"""Fixtures shared by several test packages."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from codetr.core.registry import registry

REPO = Path(__file__).resolve().parents[1]
SIMOTA_SRC = REPO / "examples" / "plugin_assigner"


@pytest.fixture(scope="session")
def simota_installed():
    """The example plugin package installed into the test environment (as a user would with pip).

    Installed editable, so the test always runs the plugin's current source; an older non-editable copy
    found in the environment is replaced.
    """
    try:
        import codetr_simota
        current = Path(codetr_simota.__file__).resolve().is_relative_to(SIMOTA_SRC)
    except ImportError:
        current = False
    if not current:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(SIMOTA_SRC)],
                       check=True)
        importlib.invalidate_caches()
        if str(SIMOTA_SRC) not in sys.path:  # what the editable install's .pth does at the next start
            sys.path.append(str(SIMOTA_SRC))
        for name in [m for m in sys.modules if m == "codetr_simota" or m.startswith("codetr_simota.")]:
            del sys.modules[name]
    registry.refresh()
    yield
    registry.refresh()


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (the reference fixtures were made so; README §6 of each)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
