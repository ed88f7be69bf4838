#!/usr/bin/env bash
# Runs the whole test suite on a fresh clone: sets up .venv, then pytest.
# The parity tests need the official reference outputs: CODETR_REFERENCE_OUTPUTS (default ../shared/reference-outputs).
# With CODETR_REQUIRE_REFERENCE=1 (set by CI) a missing fixture is an error instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the package layers contract ([tool.importlinter] in pyproject.toml): imports point down only
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
