#!/usr/bin/env bash
# README command 1: install everything, run the Fashion-MNIST demo study, print the comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/transferlab demo --runs-dir runs "$@"
