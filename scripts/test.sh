#!/usr/bin/env bash
# README command 2: install everything and run the test suite (slow real-data runs deselected).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not slow" -q "$@"
