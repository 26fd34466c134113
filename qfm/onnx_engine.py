"""An exported ONNX model run by onnxruntime, with numpy only (no torch): the file's names, and its loader.

``load_onnx_model`` returns (scorer, state) like ``qfm.train.fit.load_trained_model``: the scorer maps uint8
crops (N, S, S, 3) to scores (N,), and state["crop"] holds the crop settings read from the file's metadata,
so qfm.inference cuts the same test-grid crops and averages them the same way. qfm.export writes the file
with the names defined here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from qfm.errors import ConfigError, DataError

INPUT_NAME, OUTPUT_NAME = "crops", "score"
ONNX_FILE = "model.onnx"  # the file `qfm score --engine onnxruntime` looks for in a model folder
CROP_KEY = "qfm.crop"  # JSON of the CropConfig (dtype uint8): what a scorer needs to cut the crops


class OnnxRuntimeScorer:
    """uint8 crops (N, S, S, 3), 0-255 RGB -> float32 scores (N,) through an onnxruntime session on the CPU."""

    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
            got = f"{type(crops).__name__} {getattr(crops, 'dtype', '')} {tuple(getattr(crops, 'shape', ()))}"
            raise ConfigError(f"the onnxruntime engine takes a numpy uint8 array of crops (N, S, S, 3), got {got}")
        return self.session.run(None, {INPUT_NAME: np.ascontiguousarray(crops)})[0]


def onnx_file(model_ref: str | Path) -> Path:
    """The .onnx file given, or model.onnx in the folder given; a DataError naming what is missing."""
    ref = Path(model_ref)
    if ref.is_dir():
        ref = ref / ONNX_FILE
        if not ref.is_file():
            raise DataError(f"--model {model_ref} holds no {ONNX_FILE}: export one with `qfm export --model "
                            f"{model_ref} --format onnx --out {ref}`, or pass the .onnx file")
    elif not ref.is_file():
        raise DataError(f"--model {ref} does not exist: the onnxruntime engine takes a .onnx file (from qfm export) "
                        f"or a folder holding {ONNX_FILE}")
    elif ref.suffix.lower() != ".onnx":
        raise ConfigError(f"--model {ref} is not a .onnx file: the onnxruntime engine scores an exported model "
                          "(qfm export --format onnx); use --engine torch for a checkpoint")
    return ref


def default_threads() -> int:
    """torch's current thread count when torch is loaded (so run.threads and test settings apply to both
    engines), else 0: onnxruntime's own choice (one a physical core)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 0


def load_onnx_model(model_ref: str | Path, threads: int | None = None) -> tuple[OnnxRuntimeScorer, dict]:
    """(scorer, {'crop': crop settings, 'metadata': all metadata}) for an ONNX export; threads: onnxruntime's
    intra-op threads (default: default_threads())."""
    import onnxruntime as ort

    path = onnx_file(model_ref)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise DataError(f"--model {path} cannot be loaded by onnxruntime ({exc})") from exc
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if CROP_KEY not in metadata:
        raise DataError(f"--model {path} has no '{CROP_KEY}' metadata: it was not written by qfm export, so its "
                        "crop settings are unknown")
    return OnnxRuntimeScorer(session), {"crop": json.loads(metadata[CROP_KEY]), "metadata": metadata}
