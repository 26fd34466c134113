#!/usr/bin/env bash
# Install (if needed) and run the whole pipeline on the built-in demo dataset with `dvc repro`; every stage is
# tracked in MLflow (./mlflow.db, or $MLFLOW_TRACKING_URI) and `promote` registers the student.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
venv="${QFM_VENV:-.venv}"
export PATH="$(cd "$venv" && pwd)/bin:$PATH"
export QFM_PIPELINE_RUN="${QFM_PIPELINE_RUN:-demo-$(date -u +%Y%m%dT%H%M%SZ)}"  # groups this run's stages in MLflow
dvc repro "$@"
echo
echo "qfm: demo pipeline done (MLflow tag qfm.pipeline_run=$QFM_PIPELINE_RUN for the stages that ran). Where to look:"
python - <<'PY'
import json
import os

m = json.load(open("artifacts/evaluate/metrics.json"))["metrics"]
p = json.load(open("artifacts/promote/promotion.json"))
plcc = "n/a" if m["plcc_logistic"] is None else f"{m['plcc_logistic']:.3f}"
print(f"  test metrics ({m['n']} images): SRCC {m['srcc']:.3f}, KRCC {m['krcc']:.3f}, PLCC raw {m['plcc_raw']:.3f}, "
      f"PLCC fitted {plcc}, RMSE {m['rmse_raw']:.3f}  (artifacts/evaluate/metrics.json, scatter.png; dvc metrics show)")
print(f"  registered model:  {p['model_name']} version {p['version']}, alias {' + '.join(p['aliases'])}; "
      f"champion is version {p['champion_version']}")
print(f"  promotion:         {p['reason']}")
uri = os.environ.get("MLFLOW_TRACKING_URI")
ui = f"open {uri}" if uri else ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then http://127.0.0.1:5000)"
print(f"  MLflow runs:       {ui}")
print(f"  serve the champion: PATH=.venv/bin:$PATH mlflow models serve -m {p['model_uri']} --env-manager local -p 5001")
PY
echo "  validation report: artifacts/validate/validation.html (and .json)"
echo "  teacher / student: artifacts/teacher/, artifacts/student/ (best.safetensors, history.json, training_curves.png; dvc plots show)"
echo "  score your photos: .venv/bin/qfm score PHOTO_OR_FOLDER --model artifacts/student  (or --model models:/qfm-iqm@champion)"
