#!/usr/bin/env bash
# Install (if needed) and run the whole pipeline on the built-in demo dataset with `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
dvc repro "$@"
qfm summary --artifacts artifacts || true
