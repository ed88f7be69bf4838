#!/usr/bin/env bash
# The CPU quickstart on a fresh clone: set up .venv, make the synthetic dataset, train a small model,
# evaluate (COCO AP table) and save a picture of predictions next to ground truth.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/codetr quickstart "$@"
