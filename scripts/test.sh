#!/usr/bin/env bash
# README command 2: install everything, lint (ruff, rules in pyproject.toml), build the documentation
# site strictly (a broken link, anchor or API reference, or a page missing from mkdocs.yml's nav fails;
# the site goes to site/, git-ignored), then run the test suite (slow real-data runs deselected;
# tests/test_layers.py checks the import layers, tests/test_docs.py the docs' keys and examples).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict  # not --quiet: it silences the warnings --strict counts
exec .venv/bin/python -m pytest -m "not slow and not gpu" -q "$@"
