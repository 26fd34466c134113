#!/usr/bin/env bash
# Install (if needed) and run the whole pipeline on the built-in demo dataset with `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
dvc repro "$@"
echo
echo "qfm: demo pipeline done. Where to look:"
echo "  manifest and ingest report: artifacts/ingest/manifest.parquet, artifacts/ingest/ingest_report.json"
echo "  validation report:          artifacts/validate/validation.html (and .json)"
echo "  teacher / student:          artifacts/teacher/, artifacts/student/ (best.pt, history.json, training_curves.png)"
echo "  test metrics and scatter:   artifacts/evaluate/metrics.json, artifacts/evaluate/scatter.png"
echo "  score your own photos:      .venv/bin/qfm score PHOTO_OR_FOLDER --model artifacts/student"
