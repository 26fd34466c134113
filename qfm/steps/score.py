"""score: a trained model's quality scores for image files or folders (deterministic multi-crop test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from qfm.data.images import IMAGE_SUFFIXES, list_images
from qfm.data.torch_dataset import CropConfig, ImageListDataset, make_loader
from qfm.errors import DataError
from qfm.steps.common import model_path, recording_errors
from qfm.train.engine import predict, resolve_device
from qfm.train.fit import load_trained_model


def collect_images(paths: list[str | Path]) -> list[Path]:
    """Files as given (any suffix: a bad one is reported when decoded) and image files below folders."""
    out: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise DataError(f"folder {item} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif item.exists():
            out.append(item)
        else:
            raise DataError(f"{item} does not exist")
    if not out:
        raise DataError("no images to score: pass image files or folders")
    return out


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
                 workers: int = 2, progress: bool = True) -> pd.DataFrame:
    """One row per image: path, score (0-1, higher = better), crop_std, error (None when it decoded)."""
    model, state = load_scoring_model(model_ref, device)
    return score_files(model, state, collect_images(paths), device=device, batch_size=batch_size, workers=workers,
                       progress=progress)


def score_files(model: nn.Module, state: dict, files: list[Path], *, device: str = "auto", batch_size: int = 16,
                workers: int = 2, progress: bool = True) -> pd.DataFrame:
    """Score these files with a loaded model (one row each, in order; unreadable ones get an error)."""
    dataset = ImageListDataset(files, CropConfig(**state["crop"]), train=False, on_error="report")
    errors: dict[int, str] = {}
    loader = recording_errors(make_loader(dataset, batch_size, workers), errors)
    index, score, spread = predict(model, loader, resolve_device(device), progress=progress, desc="score")
    frame = pd.DataFrame({"path": [str(f) for f in files], "score": np.nan, "crop_std": np.nan, "error": None})
    frame.loc[index, "score"] = score
    frame.loc[index, "crop_std"] = spread
    for i, error in errors.items():
        frame.loc[i, "error"] = error
    return frame


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
