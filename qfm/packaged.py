"""The pretrained model that ships inside the package (qfm/pretrained/), and the map from the model's [0, 1]
score back to its training set's published score scale.

The folder holds model.safetensors (and its .sha256) for the torch engine, model.onnx for onnxruntime,
pretrained.json (the data, its score scale, the recipe, the validation figures, the commit) and
MODEL_CARD.md. `qfm score` without --model and `qfm.load()` use it; `qfm train-final --package` writes it.
numpy only: no torch is imported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from qfm.errors import ConfigError, DataError

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
METADATA_FILE = "pretrained.json"
CARD_FILE = "MODEL_CARD.md"
MOS_COLUMN, SCALE_COLUMN = "mos", "mos_scale"
ENGINES = ("torch", "onnxruntime")


def pretrained_dir(folder: str | Path | None = None) -> Path:
    """The packaged model's folder (or `folder`), after checking that it holds a model; a DataError saying
    what to do otherwise."""
    folder = Path(folder) if folder is not None else PRETRAINED_DIR
    if not (folder / METADATA_FILE).is_file():
        raise DataError(f"no packaged model in {folder} ({METADATA_FILE} is missing): this qfm was installed "
                        "without its pretrained model; pass --model with a trained model folder, or rebuild it "
                        "(scripts/build_pretrained.sh)")
    return folder


def packaged_model(engine: str = "torch", folder: str | Path | None = None) -> Path:
    """The packaged model file for an engine: model.safetensors (torch) or model.onnx (onnxruntime)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine '{engine}'; known engines: {', '.join(ENGINES)}")
    path = pretrained_dir(folder) / (WEIGHTS_FILE if engine == "torch" else ONNX_FILE)
    if not path.is_file():
        raise DataError(f"the packaged model has no {path.name} for the {engine} engine; rebuild it "
                        "(scripts/build_pretrained.sh)")
    return path


def read_metadata(folder: str | Path | None = None) -> dict:
    """pretrained.json of the packaged model (or of `folder`)."""
    return json.loads((pretrained_dir(folder) / METADATA_FILE).read_text())


def check_scale(scale: dict, where: str) -> dict:
    """A score scale record {lo, hi, higher_is_better, kind} (the manifest's), checked; errors name where."""
    try:
        lo, hi = float(scale["lo"]), float(scale["hi"])
        higher = scale["higher_is_better"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: the score scale {scale!r} needs numbers lo and hi and higher_is_better "
                        f"({exc})") from None
    if not hi > lo or not isinstance(higher, bool):
        raise DataError(f"{where}: the score scale {scale!r} is not valid (hi must exceed lo; higher_is_better "
                        "true or false)")
    return {"lo": lo, "hi": hi, "higher_is_better": higher, "kind": str(scale.get("kind", "MOS"))}


def to_mos(score: float | np.ndarray, scale: dict) -> np.ndarray:
    """The model's [0, 1] score (higher = better) on the training set's published scale: the inverse of
    the ingest map (raw - lo) / (hi - lo), flipped for a scale where lower is better (e.g. DMOS)."""
    unit = np.asarray(score, dtype=float)
    span = scale["hi"] - scale["lo"]
    return scale["lo"] + unit * span if scale["higher_is_better"] else scale["hi"] - unit * span


def scale_label(scale: dict, dataset: str = "") -> str:
    """E.g. 'MOS 0-100 of livec, higher is better'."""
    kind, lo, hi = scale.get("kind", "MOS"), scale["lo"], scale["hi"]
    number = "{:g}".format
    where = f" of {dataset}" if dataset else ""
    return f"{kind} {number(lo)}-{number(hi)}{where}, {'higher' if scale['higher_is_better'] else 'lower'} is better"


def model_scale(model_ref: str | Path | None) -> tuple[dict, str] | None:
    """(scale, dataset) recorded beside a model: the packaged model's (model_ref None), or pretrained.json /
    final.json (qfm train-final) in the model's folder; None when the model records none."""
    if model_ref is None:
        meta = read_metadata()
        return check_scale(meta["scale"], METADATA_FILE), meta.get("dataset", "")
    ref = Path(str(model_ref))
    folder = ref if ref.is_dir() else ref.parent
    for name in (METADATA_FILE, "final.json"):
        path = folder / name
        if path.is_file() and not str(model_ref).startswith("models:/"):
            meta = json.loads(path.read_text())
            if meta.get("scale"):
                return check_scale(meta["scale"], str(path)), meta.get("dataset", "")
    return None


def with_mos(frame: pd.DataFrame, scale: dict, dataset: str = "") -> pd.DataFrame:
    """A score table (path, score, ...) with the columns mos (the score on the training set's scale) and
    mos_scale (that scale in words) right after score."""
    out = frame.copy()
    at = out.columns.get_loc("score") + 1
    out.insert(at, MOS_COLUMN, to_mos(out["score"].to_numpy(dtype=float), scale))
    out.insert(at + 1, SCALE_COLUMN, scale_label(scale, dataset))
    return out
