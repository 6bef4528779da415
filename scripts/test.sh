#!/usr/bin/env bash
# Sets up (scripts/setup.sh dev), then runs ruff and the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
