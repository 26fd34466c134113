"""score: a trained model's quality scores for image files or folders (deterministic multi-crop test): find
the model (a folder, a checkpoint or a registered version; or an ONNX export for the onnxruntime engine),
score through qfm.inference, write the table. The onnxruntime engine imports no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qfm.errors import ConfigError
from qfm.inference import collect_images, score_files

if TYPE_CHECKING:
    from torch import nn

    from qfm.onnx_engine import OnnxRuntimeScorer

MODEL_URI = "models:/"
ENGINES = ("torch", "onnxruntime")


def load_scoring_model(model_ref: str | Path, device: str = "auto") -> tuple[nn.Module, dict]:
    """(model, checkpoint state) from a model folder, a best.safetensors, or a registered model (models:/NAME@ALIAS,
    models:/NAME/VERSION; the MLflow tracking URI is $MLFLOW_TRACKING_URI, else the project's default)."""
    from qfm.runtime import resolve_device
    from qfm.train.checkpoint import model_path
    from qfm.train.fit import load_trained_model

    if str(model_ref).startswith(MODEL_URI):
        from qfm.config import TrackingParams
        from qfm.registry.versions import checkpoint_from_uri
        from qfm.tracking import tracking_uri

        with checkpoint_from_uri(str(model_ref), tracking_uri(TrackingParams())) as path:
            return load_trained_model(path, resolve_device(device))
    return load_trained_model(model_path(model_ref), resolve_device(device))


def load_engine_model(model_ref: str | Path, engine: str = "torch",
                      device: str = "auto") -> tuple[nn.Module | OnnxRuntimeScorer, dict, str]:
    """(model, state, device) for an engine: torch loads a checkpoint (see load_scoring_model); onnxruntime a
    .onnx file from qfm export, or model.onnx in the folder given, and runs on the CPU."""
    if engine == "torch":
        return (*load_scoring_model(model_ref, device), device)
    if engine != "onnxruntime":
        raise ConfigError(f"unknown engine '{engine}'; known engines: {', '.join(ENGINES)}")
    if device not in ("auto", "cpu"):
        raise ConfigError(f"the onnxruntime engine runs on the CPU; drop --device {device} or use --engine torch")
    if str(model_ref).startswith(MODEL_URI):
        raise ConfigError("the onnxruntime engine scores an exported .onnx file, not a registered model "
                          f"({model_ref}); use --engine torch, or export the model with qfm export")
    from qfm.onnx_engine import load_onnx_model

    return (*load_onnx_model(model_ref), "cpu")


def score_images(model_ref: str | Path, paths: list[str | Path], *, device: str = "auto", batch_size: int = 16,
                 workers: int | str = "auto", progress: bool = True, engine: str = "torch") -> pd.DataFrame:
    """One row per image: path, score (0-1, higher = better), crop_std, error (None when it decoded).
    engine: torch (a checkpoint) or onnxruntime (an ONNX export; the same crops and averaging)."""
    model, state, device = load_engine_model(model_ref, engine, device)
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
