"""score: a trained model's quality scores for image files or folders (deterministic multi-crop test): find
the model (a folder, a checkpoint or a registered version; or an ONNX export for the onnxruntime engine),
score through qfm.inference, write the table. The onnxruntime engine imports no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qfm.inference import collect_images, load_engine_model, score_files


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
