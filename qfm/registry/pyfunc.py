"""The MLflow pyfunc flavour of a trained qfm model: a DataFrame of images in, one score per row out.

Input columns (one of them per row): `path`, an image file the server can read, or `image`, the encoded
file's bytes (base64 text in a JSON request; MLflow decodes binary columns). Output columns: `score`
(0-1, higher = better, the deterministic multi-crop test of `qfm score`), `crop_std`, `error` (None, or
why the row's image could not be read). The model's artifact is the checkpoint folder (best.pt and its
checksum); scoring is qfm.inference's, as for `qfm score`, so `mlflow models serve` and `qfm score` give the same numbers.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, Schema
from torch import nn

from qfm.errors import DataError

ARTIFACT = "checkpoint"
DEVICE_ENV = "QFM_DEVICE"           # device of a served model (default auto: CUDA when present)
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pyarrow", "pillow", "scipy",
                "matplotlib", "tqdm", "pyyaml")


class QfmScorer(mlflow.pyfunc.PythonModel):
    """Loads best.pt once; predict scores a DataFrame with a `path` and/or an `image` column."""

    def load_context(self, context) -> None:
        from qfm.runtime import resolve_device
        from qfm.train.fit import load_trained_model

        self.device = os.environ.get(DEVICE_ENV, "auto")
        path = Path(context.artifacts[ARTIFACT]) / "best.pt"
        self.model, self.state = load_trained_model(path, resolve_device(self.device))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return score_frame(self.model, self.state, model_input, device=self.device)


def score_frame(model: nn.Module, state: dict, frame: pd.DataFrame, *, device: str = "auto",
                batch_size: int = 16) -> pd.DataFrame:
    """Score each row's image (bytes in `image`, else the file in `path`); rows keep their order."""
    from qfm.inference import score_files

    if not isinstance(frame, pd.DataFrame) or not {"path", "image"} & set(frame.columns):
        got = list(frame.columns) if isinstance(frame, pd.DataFrame) else type(frame).__name__
        raise DataError(f"qfm model input needs a 'path' column (image files) or an 'image' column (the image "
                        f"file's bytes, base64 in JSON); got {got}")
    n = len(frame)
    paths = frame["path"].tolist() if "path" in frame.columns else [None] * n
    blobs = frame["image"].tolist() if "image" in frame.columns else [None] * n
    notes: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="qfm-score-") as tmp:
        files = []
        for i, (path, blob) in enumerate(zip(paths, blobs)):
            target = Path(tmp) / f"row_{i}"
            if _present(blob):
                try:
                    target.write_bytes(_as_bytes(blob))
                except (binascii.Error, ValueError, TypeError):
                    notes[i] = f"row {i}: 'image' is neither bytes nor base64 text"
            elif _present(path):
                target = Path(str(path))
            else:
                notes[i] = f"row {i} has neither a 'path' nor an 'image'"
            files.append(target)
        scored = score_files(model, state, files, device=device, batch_size=batch_size, workers=0, progress=False)
    out = scored[["score", "crop_std", "error"]].reset_index(drop=True)
    for i, note in notes.items():
        out.loc[i, ["score", "crop_std", "error"]] = [float("nan"), float("nan"), note]
    return out


def _present(value) -> bool:
    """A non-empty cell (pandas fills a missing one with None or NaN)."""
    return isinstance(value, (str, bytes, bytearray, memoryview)) and len(value) > 0


def _as_bytes(blob) -> bytes:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return bytes(blob)
    return base64.b64decode(str(blob), validate=True)


def signature() -> ModelSignature:
    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)])
    outputs = Schema([ColSpec("double", "score"), ColSpec("double", "crop_std"),
                      ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """Pinned versions of what scoring imports (qfm itself is installed from the project)."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def log_scorer(checkpoint: str | Path, example_image: str | Path, name: str = "model") -> ModelInfo:
    """Log best.pt (and its checksum) as a pyfunc model in the active run, with the signature and one
    image's bytes as the input example; returns MLflow's ModelInfo."""
    checkpoint = Path(checkpoint)
    with tempfile.TemporaryDirectory(prefix="qfm-ckpt-") as tmp:
        folder = Path(tmp) / ARTIFACT
        folder.mkdir()
        for file in (checkpoint, checkpoint.with_name(checkpoint.name + ".sha256")):
            shutil.copy2(file, folder / file.name.replace(checkpoint.name, "best.pt"))
        example = pd.DataFrame({"image": [Path(example_image).read_bytes()]})
        code = Path(__file__).with_name("model_code.py")  # models from code: no pickled object in the model
        return mlflow.pyfunc.log_model(name=name, python_model=str(code), artifacts={ARTIFACT: str(folder)},
                                       signature=signature(), input_example=example,
                                       pip_requirements=requirements())
