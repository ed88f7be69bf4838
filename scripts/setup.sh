#!/usr/bin/env bash
# Creates .venv (once) and installs codetr with its test extras. Idempotent; safe to re-run.
# Pretrained weights and datasets are never downloaded by codetr (see docs/getting_started.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CODETR_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.codetr-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] installing torch + torchvision (${CODETR_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1})"
    # shellcheck disable=SC2086
    "$VPY" -m pip install -q ${CODETR_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
  fi
  echo "[setup] installing codetr (editable) with test extras"
  "$VPY" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
