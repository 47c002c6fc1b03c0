#!/usr/bin/env bash
# README command 2: install everything, lint (ruff, rules in pyproject.toml), run the test suite
# (slow real-data runs deselected; tests/test_layers.py checks the import layers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -m "not slow" -q "$@"
