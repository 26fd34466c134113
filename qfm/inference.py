"""Scoring image files with a loaded model: the deterministic multi-crop test, one row per file, in order;
and loading the model for an engine (a torch checkpoint, a registered version or an ONNX export).

`qfm score` (qfm.steps.score) and the MLflow pyfunc model (qfm.registry.pyfunc) both score through here,
so a served model and the command give the same numbers. A torch model scores through the torch loader;
an onnxruntime scorer (qfm.onnx_engine) through numpy only, so that path imports no torch. Both cut the
same crops and average them the same way (qfm.data.crops).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm import tqdm

from qfm.data.crops import CropConfig, decode, grid_crops, per_image_stats, positive_int
from qfm.data.images import IMAGE_SUFFIXES, list_images
from qfm.errors import ConfigError, DataError
from qfm.onnx_engine import OnnxRuntimeScorer, load_onnx_model

if TYPE_CHECKING:
    import torch
    from torch import nn

Predictions = tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]  # index, mean, std, errors by index
MODEL_URI = "models:/"
ENGINES = ("torch", "onnxruntime")


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

    return (*load_onnx_model(model_ref), "cpu")


def recording_errors(loader, errors: dict[int, str]):
    """Pass an ImageListDataset loader's batches through, noting each image that failed to decode."""
    for batch in loader:
        errors.update({i: e for i, e in zip(batch["index"].tolist(), batch["error"]) if e})
        yield batch


def score_files(model: nn.Module | OnnxRuntimeScorer, state: dict, files: list[Path], *,
                device: str | torch.device = "auto", batch_size: int = 16, workers: int | str = "auto",
                progress: bool = True) -> pd.DataFrame:
    """Score these files with a loaded model (state: its checkpoint or export metadata, for the crop settings):
    one row each, in order, with path, score (0-1, higher = better), crop_std and error (None when the image
    decoded). batch_size counts images; device and workers (DataLoader worker processes) are the torch
    engine's: an onnxruntime scorer runs on the CPU and decodes in this process."""
    config = CropConfig(**state["crop"])
    if isinstance(model, OnnxRuntimeScorer):
        index, score, spread, errors = predict_onnx(model, config, files, batch_size=batch_size, progress=progress)
    else:
        index, score, spread, errors = _predict_torch(model, config, files, device, batch_size, workers, progress)
    frame = pd.DataFrame({"path": [str(f) for f in files], "score": np.nan, "crop_std": np.nan, "error": None})
    frame.loc[index, "score"] = score
    frame.loc[index, "crop_std"] = spread
    for i, error in errors.items():
        frame.loc[i, "error"] = error
    return frame


def predict_onnx(scorer: OnnxRuntimeScorer, config: CropConfig, files: list[Path], *, batch_size: int = 16,
                 progress: bool = False) -> Predictions:
    """Test-grid crops of batch_size images at a time through the scorer, numpy only: (index, mean, std over
    crops) of each image that decoded, and the DataError text of each that did not, by its position in files."""
    batch_size = positive_int(batch_size, "batch_size")
    errors: dict[int, str] = {}
    preds, crop_index = [], []
    for start in tqdm(range(0, len(files), batch_size), desc="score", unit="batch", disable=not progress,
                      leave=False):
        blocks, owners = [], []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                crops = grid_crops(decode(files[i], config, f"image list entry {i}"), config)
            except DataError as exc:
                errors[i] = str(exc)
                continue
            blocks.append(crops)
            owners.append(np.full(len(crops), i, dtype=np.int64))
        if blocks:
            preds.append(scorer(np.concatenate(blocks)))
            crop_index.append(np.concatenate(owners))
    if not preds:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0), errors
    return (*per_image_stats(np.concatenate(preds), np.concatenate(crop_index)), errors)


def _predict_torch(model: nn.Module, config: CropConfig, files: list[Path], device: str | torch.device,
                   batch_size: int, workers: int | str, progress: bool) -> Predictions:
    """The torch loader's test-grid crops through a torch model (qfm.train.engine.predict)."""
    from qfm.data.torch_dataset import ImageListDataset, make_loader
    from qfm.runtime import loader_workers, resolve_device
    from qfm.train.engine import predict

    dataset = ImageListDataset(files, config, train=False, on_error="report")
    errors: dict[int, str] = {}
    device = resolve_device(device)
    loader = recording_errors(make_loader(dataset, batch_size, loader_workers(workers, device)), errors)
    return (*predict(model, loader, device, progress=progress, desc="score"), errors)
