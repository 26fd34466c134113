"""Scoring image files with a loaded model: the deterministic multi-crop test, one row per file, in order.

`qfm score` (qfm.steps.score) and the MLflow pyfunc model (qfm.registry.pyfunc) both score through here,
so a served model and the command give the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from qfm.data.images import IMAGE_SUFFIXES, list_images
from qfm.data.torch_dataset import CropConfig, ImageListDataset, make_loader
from qfm.errors import DataError
from qfm.runtime import loader_workers, resolve_device
from qfm.train.engine import predict


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


def recording_errors(loader, errors: dict[int, str]):
    """Pass an ImageListDataset loader's batches through, noting each image that failed to decode."""
    for batch in loader:
        errors.update({i: e for i, e in zip(batch["index"].tolist(), batch["error"]) if e})
        yield batch


def score_files(model: nn.Module, state: dict, files: list[Path], *, device: str | torch.device = "auto",
                batch_size: int = 16, workers: int | str = "auto", progress: bool = True) -> pd.DataFrame:
    """Score these files with a loaded model (state: its checkpoint, for the crop settings): one row each, in
    order, with path, score (0-1, higher = better), crop_std and error (None when the image decoded)."""
    dataset = ImageListDataset(files, CropConfig(**state["crop"]), train=False, on_error="report")
    errors: dict[int, str] = {}
    device = resolve_device(device)
    loader = recording_errors(make_loader(dataset, batch_size, loader_workers(workers, device)), errors)
    index, score, spread = predict(model, loader, device, progress=progress, desc="score")
    frame = pd.DataFrame({"path": [str(f) for f in files], "score": np.nan, "crop_std": np.nan, "error": None})
    frame.loc[index, "score"] = score
    frame.loc[index, "crop_std"] = spread
    for i, error in errors.items():
        frame.loc[i, "error"] = error
    return frame
