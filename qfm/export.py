"""Export a trained model to ONNX or TorchScript for scoring without the training code.

The exported graph takes uint8 RGB crops laid out (N, H, W, 3) with a dynamic N, normalises them inside the
graph with the same float32 arithmetic as ``QfmIqm.prepare`` (x * pixel_scale - pixel_shift), and returns
one float32 score per crop (N,). An image's score is the mean over its test-grid crops, which the caller
cuts (qfm.inference does, for `qfm score --engine onnxruntime`). The crop settings, score scale, training
data version and validation metrics travel with the file: ONNX metadata_props, or a TorchScript extra file.
The ONNX file's input, output and metadata names are defined by its reader, qfm.onnx_engine (no torch).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qfm.data.crops import CropConfig
from qfm.errors import ConfigError, DataError
from qfm.onnx_engine import CROP_KEY, INPUT_NAME, ONNX_FILE, OUTPUT_NAME
from qfm.train.checkpoint import LAST, SIDECAR, load_checkpoint, model_path
from qfm.train.fit import load_trained_model

FORMATS = ("onnx", "torchscript")
TORCHSCRIPT_METADATA = "qfm.json"  # the TorchScript extra file holding the metadata
OPSET = 17
VAL_SPLIT_KEY = "qfm.val_split"  # the split the model was chosen on (JSON: name, val_ids_sha256)
SCORE_SCALE = "0-1, higher is better (the training scores mapped to [0, 1] by qfm ingest)"


class Uint8CropScorer(nn.Module):
    """uint8 crops (N, H, W, 3), 0-255 RGB -> scores (N,); the model's own normalisation inside the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.contiguous_format)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = crops.permute(0, 3, 1, 2).to(torch.float32)
        # float input is used as given by QfmIqm.prepare: this is its uint8 arithmetic, done here
        return self.model(x * self.model.pixel_scale - self.model.pixel_shift)


def export_metadata(checkpoint: Path, state: dict) -> dict[str, str]:
    """The metadata written with an export, every value a string (JSON for structured values)."""
    crop = CropConfig(**(state["crop"] | {"dtype": "uint8"}))
    rows, cols = crop.test_grid if isinstance(crop.test_grid, tuple) else (crop.test_grid, None)
    grid = f"{rows}x{cols}" if cols is not None else f"{rows} crops"
    identity = _run_identity(checkpoint.with_name(LAST))
    sidecar = checkpoint.with_name(checkpoint.name + SIDECAR)
    return {
        "qfm.input": f"{INPUT_NAME}: uint8 (N, {crop.crop_size}, {crop.crop_size}, 3), RGB 0-255, N dynamic; "
                     "normalised inside the graph",
        "qfm.output": f"{OUTPUT_NAME}: float32 (N,), one per crop; an image's score is the mean over its "
                      "test-grid crops",
        "qfm.input_size": f"{crop.crop_size}x{crop.crop_size}",
        "qfm.crop_grid": grid,
        CROP_KEY: json.dumps(asdict(crop)),
        "qfm.score_scale": SCORE_SCALE,
        "qfm.model_config": json.dumps(state.get("model_config", {})),
        "qfm.epoch": str(state.get("epoch", "")),
        "qfm.val_metrics": json.dumps(state.get("val", {}), default=str),
        "qfm.train_data_version": identity.get("train", "unknown"),
        "qfm.val_data_version": identity.get("val", "unknown"),
        "qfm.checkpoint_sha256": sidecar.read_text().strip() if sidecar.is_file() else "unknown",
        VAL_SPLIT_KEY: json.dumps(recorded_split(checkpoint, state)),
    }


def recorded_split(checkpoint: Path, state: dict) -> dict:
    """The split the model was chosen on: {"name", "val_ids_sha256"} as training recorded it in the checkpoint;
    for a checkpoint of an older qfm, only the name from the summary.json beside it ({} when there is none)."""
    if state.get("val_split"):
        return dict(state["val_split"])
    summary = checkpoint.with_name("summary.json")
    try:
        name = json.loads(summary.read_text()).get("split") if summary.is_file() else None
    except (OSError, ValueError, AttributeError):
        name = None
    return {"name": name} if isinstance(name, str) else {}


def _run_identity(last: Path) -> dict:
    """The data digests (SHA-256 of image ids, scores and crop settings) of the run, from last.safetensors if present."""
    if not last.is_file():
        return {}
    try:
        return dict(load_checkpoint(last).get("identity", {}).get("data", {}))
    except DataError:
        return {}


def export_model(model_ref: str | Path, fmt: str, out: str | Path, opset: int = OPSET) -> dict[str, str]:
    """Write the model at model_ref (a folder with best.safetensors, or a checkpoint) as fmt to out; returns its metadata."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; known formats: {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the file to write, e.g. {out / ONNX_FILE}")
    checkpoint = model_path(model_ref)
    model, state = load_trained_model(checkpoint, "cpu")
    metadata = export_metadata(checkpoint, state)
    scorer = Uint8CropScorer(model).eval()
    size = CropConfig(**state["crop"]).crop_size
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = _onnx_bytes(scorer, example, metadata, opset) if fmt == "onnx" else _torchscript_bytes(scorer, example,
                                                                                                    metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return metadata


@contextmanager
def _tracing() -> Iterator[None]:
    """No autograd, no tracer warnings, and nn.MultiheadAttention's plain path: its inference fast path
    (aten::_native_multi_head_attention) has no ONNX form."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation note, the tracer's shape-check notes
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _onnx_bytes(scorer: nn.Module, example: torch.Tensor, metadata: dict[str, str], opset: int) -> bytes:
    """The legacy (TorchScript-based) exporter: no onnxscript needed; batch is a dynamic axis."""
    import onnx

    buffer = io.BytesIO()
    try:
        with _tracing():
            torch.onnx.export(scorer, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, dynamo=False)
    except torch.onnx.errors.OnnxExporterError as exc:
        raise ConfigError(f"the model cannot be exported to ONNX opset {opset}: {str(exc).splitlines()[0]}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _torchscript_bytes(scorer: nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """A traced module (the shape checks in the model are constant for a given crop size; batch stays free)."""
    buffer = io.BytesIO()
    with _tracing():  # also quiets torch.jit's deprecation note
        traced = torch.jit.trace(scorer, (example,), check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata, indent=2)})
    return buffer.getvalue()


def read_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """A TorchScript export and its metadata."""
    extra = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation note
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra[TORCHSCRIPT_METADATA])
