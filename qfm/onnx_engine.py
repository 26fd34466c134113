"""An exported ONNX model run by onnxruntime, behind the same interface as a loaded torch model.

``load_onnx_model`` returns (module, state) like ``qfm.train.fit.load_trained_model``: the module maps a
batch of uint8 crops (N, 3, S, S) to scores (N,), and state["crop"] holds the crop settings read from the
file's metadata, so qfm.inference cuts the same test-grid crops and averages them the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qfm.errors import ConfigError, DataError
from qfm.export import CROP_KEY, INPUT_NAME, ONNX_FILE


class OnnxRuntimeScorer(nn.Module):
    """uint8 crops (N, 3, S, S) -> scores (N,) through an onnxruntime session on the CPU."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        if crops.dtype != torch.uint8:
            raise ConfigError(f"the onnxruntime engine takes uint8 crops, got {crops.dtype}")
        nhwc = np.ascontiguousarray(crops.cpu().permute(0, 2, 3, 1).numpy())
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: nhwc})[0])


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


def load_onnx_model(model_ref: str | Path, threads: int | None = None) -> tuple[nn.Module, dict]:
    """(scorer, {'crop': crop settings, 'metadata': all metadata}) for an ONNX export; threads: onnxruntime's
    intra-op threads (default: torch's current count, so run.threads and test settings apply to both)."""
    import onnxruntime as ort

    path = onnx_file(model_ref)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise DataError(f"--model {path} cannot be loaded by onnxruntime ({exc})") from exc
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if CROP_KEY not in metadata:
        raise DataError(f"--model {path} has no '{CROP_KEY}' metadata: it was not written by qfm export, so its "
                        "crop settings are unknown")
    return OnnxRuntimeScorer(session).eval(), {"crop": json.loads(metadata[CROP_KEY]), "metadata": metadata}
