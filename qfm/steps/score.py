"""score: a trained model's quality scores for image files or folders (deterministic multi-crop test): find
the model (a folder, a checkpoint or a registered version), score through qfm.inference, write the table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from torch import nn

from qfm.inference import collect_images, score_files
from qfm.runtime import resolve_device
from qfm.steps.common import model_path
from qfm.train.fit import load_trained_model

MODEL_URI = "models:/"


def load_scoring_model(model_ref: str | Path, device: str = "auto") -> tuple[nn.Module, dict]:
    """(model, checkpoint state) from a model folder, a best.pt, or a registered model (models:/NAME@ALIAS,
    models:/NAME/VERSION; the MLflow tracking URI is $MLFLOW_TRACKING_URI, else the project's default)."""
    if str(model_ref).startswith(MODEL_URI):
        from qfm.config import TrackingParams
        from qfm.registry.versions import checkpoint_from_uri
        from qfm.tracking import tracking_uri

        with checkpoint_from_uri(str(model_ref), tracking_uri(TrackingParams())) as path:
            return load_trained_model(path, resolve_device(device))
    ref = Path(model_ref)
    return load_trained_model(ref if ref.is_file() else model_path(ref), resolve_device(device))


def score_images(model_ref: str | Path, paths: list[str | Path], *, device: str = "auto", batch_size: int = 16,
                 workers: int | str = "auto", progress: bool = True) -> pd.DataFrame:
    """One row per image: path, score (0-1, higher = better), crop_std, error (None when it decoded)."""
    model, state = load_scoring_model(model_ref, device)
    return score_files(model, state, collect_images(paths), device=device, batch_size=batch_size, workers=workers,
                       progress=progress)


def write_scores(frame: pd.DataFrame, out: str | Path | None) -> str:
    """CSV or JSON by suffix; returns the text when out is None (CSV)."""
    if out is None:
        return frame.to_csv(index=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(json.loads(frame.to_json(orient="records")), indent=2) + "\n")
    else:
        frame.to_csv(out, index=False)
    return str(out)
