"""The MLflow pyfunc flavour of a trained qfm model: a DataFrame of images in, one score per row out.

Input columns (one of them per row): `image`, the encoded file's bytes (base64 text in a JSON request), or
`path`, an image file the model can read. Output columns: `score` (0-1, higher = better, the deterministic
multi-crop test of `qfm score`), `crop_std`, `error` (None, or why the row's image could not be scored).
Scoring is qfm.inference's, as for `qfm score`, so `mlflow models serve` and `qfm score` give the same
numbers. The model's artifact is a folder with the checkpoint (best.safetensors and its checksum) and, when the model
could be exported, its ONNX form (model.onnx): `QFM_ENGINE=onnxruntime` scores with that instead of torch, and
then loading and scoring import no torch (decoding and cropping are numpy's), so a server needs none.

A request is checked before anything is decoded, and every refusal is an HTTP 400 whose message names the
row and the problem, never a stack trace or a server path: columns other than these two, no rows, bytes
that are not an image, an image over `QFM_MAX_PIXELS` pixels (read from its header: a decompression bomb is
never decoded), a damaged file, and, when served, a `path` outside the folder `QFM_SERVE_ROOT` names (no
path is read at all when it is unset). By default one bad row refuses the whole request; the request
parameter `on_error: report` scores the others and gives the bad rows an `error` instead.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import shutil
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image, UnidentifiedImageError

from qfm.errors import QfmError

if TYPE_CHECKING:
    from torch import nn

    from qfm.onnx_engine import OnnxRuntimeScorer

ARTIFACT = "checkpoint"
DEVICE_ENV = "QFM_DEVICE"           # device of a served model (default auto: CUDA when present)
ENGINE_ENV = "QFM_ENGINE"           # torch (default) | onnxruntime (the model.onnx registered with the version)
SERVE_ROOT_ENV = "QFM_SERVE_ROOT"   # the folder a served model may read `path` rows from (unset: none)
MAX_PIXELS_ENV = "QFM_MAX_PIXELS"   # the largest image (width x height) scored; default PIL's bomb limit
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # set to "true" by `mlflow models serve`
COLUMNS = ("image", "path")
ON_ERROR = ("reject", "report")
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pyarrow", "pillow", "scipy",
                "matplotlib", "tqdm", "pyyaml", "onnxruntime")
_log = logging.getLogger(__name__)


class QfmScorer(mlflow.pyfunc.PythonModel):
    """Loads the model once (torch checkpoint or ONNX export); predict scores a DataFrame of images, one
    request at a time: the model already uses every core, and concurrent requests (the scoring server runs
    each in a thread) would only oversubscribe them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def load_context(self, context) -> None:
        from qfm.inference import load_engine_model

        folder = Path(context.artifacts[ARTIFACT])
        engine = os.environ.get(ENGINE_ENV, "torch")
        self.model, self.state, self.device = load_engine_model(folder, engine, os.environ.get(DEVICE_ENV, "auto"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            with self.lock:
                return score_frame(self.model, self.state, model_input, device=self.device,
                                   on_error=(params or {}).get("on_error", "reject"))
        except MlflowException:
            raise
        except QfmError as exc:
            raise bad_request(str(exc)) from None
        except Exception:  # noqa: BLE001 (the details, and any server path, go to the server's log, not the client)
            _log.exception("scoring a request failed")
            raise MlflowException("the model could not score this request; the server's log has the details",
                                  INTERNAL_ERROR) from None


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message (no stack trace)."""
    return MlflowException(message, INVALID_PARAMETER_VALUE)


def check_request(frame: pd.DataFrame, on_error: str) -> None:
    """Refuse a request that is not a non-empty table of `image` or `path` rows, naming what it got."""
    if on_error not in ON_ERROR:
        raise bad_request(f"params.on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    if not isinstance(frame, pd.DataFrame):
        raise bad_request(f"the input must be a table (dataframe_split or dataframe_records), got "
                          f"{type(frame).__name__}")
    got = [str(c) for c in frame.columns]
    unknown = [c for c in got if c not in COLUMNS]
    if unknown or not got:
        raise bad_request(f"the input has columns {got}; the model takes 'image' (the image file's bytes, base64 "
                          "in JSON) and/or 'path' (an image file the server may read)")
    if len(frame) == 0:
        raise bad_request("the input has no rows: send one row per image")


def score_frame(model: nn.Module | OnnxRuntimeScorer, state: dict, frame: pd.DataFrame, *, device: str = "auto",
                batch_size: int = 16, on_error: str = "reject") -> pd.DataFrame:
    """Score each row's image (bytes in `image`, else the file in `path`); rows keep their order. A row that
    cannot be scored refuses the request (on_error='reject') or gets its reason in `error` ('report')."""
    from qfm.inference import score_files

    check_request(frame, on_error)
    n = len(frame)
    paths = frame["path"].tolist() if "path" in frame.columns else [None] * n
    blobs = frame["image"].tolist() if "image" in frame.columns else [None] * n
    notes: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="qfm-score-") as tmp:
        files, labels = [], {}
        for i, (path, blob) in enumerate(zip(paths, blobs)):
            target, labels[i] = Path(tmp) / f"row_{i}", f"row {i}'s image"
            try:
                if _present(blob):
                    target.write_bytes(_as_bytes(blob, i))
                elif _present(path):
                    target, labels[i] = readable_path(str(path), i), str(path)
                else:
                    raise QfmError(f"row {i} has neither an 'image' nor a 'path'")
                check_header(target, i, labels[i])
            except QfmError as exc:
                notes[i] = str(exc)
            files.append(target)
        good = [i for i in range(n) if i not in notes]
        if good:
            scored = score_files(model, state, [files[i] for i in good], device=device, batch_size=batch_size,
                                 workers=0, progress=False)
        out = pd.DataFrame({"score": float("nan"), "crop_std": float("nan"), "error": None}, index=range(n))
        if good:
            out.loc[good, ["score", "crop_std"]] = scored[["score", "crop_std"]].to_numpy()
            for row, error in zip(good, scored["error"]):
                if error:
                    notes[row] = f"row {row}: {_client_reason(error, files[row], labels[row])}"
    for row, note in notes.items():
        out.loc[row, "error"] = note
    if notes and on_error == "reject":
        listed = "; ".join(notes[row] for row in sorted(notes)[:5])
        more = f" (and {len(notes) - 5} more)" if len(notes) > 5 else ""
        raise bad_request(f"{len(notes)} of {n} rows cannot be scored: {listed}{more}. Fix them, or send "
                          "params {\"on_error\": \"report\"} to score the other rows")
    return out


def readable_path(path: str, row: int) -> Path:
    """The file a `path` row names, if this model may read it: anywhere in a Python session, only inside
    $QFM_SERVE_ROOT when served (and nowhere when that is unset)."""
    if os.environ.get(SERVING_ENV, "").lower() != "true":
        return Path(path)
    root = os.environ.get(SERVE_ROOT_ENV)
    if not root:
        raise QfmError(f"row {row}: this server reads no files; send the image's bytes in an 'image' column "
                       f"(its operator can allow paths under one folder with {SERVE_ROOT_ENV})")
    resolved = Path(root, path).resolve()  # a relative path is taken inside the root
    if not resolved.is_relative_to(Path(root).resolve()):
        raise QfmError(f"row {row}: path '{path}' is outside the folder this server may read; give a path "
                       "inside it (or a path relative to it), or send the image's bytes in an 'image' column")
    return resolved


def max_pixels() -> int:
    """$QFM_MAX_PIXELS, else PIL's decompression-bomb limit (about 89 megapixels)."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return int(Image.MAX_IMAGE_PIXELS or 0) or 89_478_485
    try:
        return int(value)
    except ValueError:
        raise QfmError(f"{MAX_PIXELS_ENV}={value!r} is not a whole number of pixels") from None


def check_header(path: Path, row: int, label: str) -> None:
    """Read only the image's header: refuse a file that is missing, not an image, or over max_pixels();
    label: how the client named the image (its path as sent, or 'row N's image')."""
    limit = max_pixels()
    if not path.is_file():
        raise QfmError(f"row {row}: image file '{label}' does not exist")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # PIL refuses at twice its limit, before decoding
        width = height = None
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise QfmError(f"row {row}: not an image file (no decoder recognises its bytes)") from None
    if width is None or width * height > limit:
        size = f"{width} x {height} pixels" if width is not None else (
            f"{pixels[1]} pixels" if pixels else "over twice the limit")
        raise QfmError(f"row {row}: the image is too large to decode ({size}; this server's limit is {limit} "
                       f"pixels, {MAX_PIXELS_ENV}); send a reduced copy")


def _client_reason(error: str, file: Path, label: str) -> str:
    """A decode error as the client may see it: the row's own label instead of the server's file name."""
    reason = re.sub(r"^image list entry \d+: ", "", error.replace(str(file), label))
    return reason.removesuffix("; replace or remove it")


def _present(value) -> bool:
    """A non-empty cell (pandas fills a missing one with None or NaN)."""
    return isinstance(value, (str, bytes, bytearray, memoryview)) and len(value) > 0


def _as_bytes(blob, row: int) -> bytes:
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return bytes(blob)
    try:
        return base64.b64decode(str(blob), validate=True)
    except (binascii.Error, ValueError):
        raise QfmError(f"row {row}: 'image' is not base64 text (send the image file's bytes, base64-encoded)") \
            from None


def signature() -> ModelSignature:
    """Outputs and the on_error parameter; no input schema, so that MLflow passes every column on and the
    model can name a wrong one (an input schema makes MLflow drop unknown columns, rows and all)."""
    outputs = Schema([ColSpec("double", "score"), ColSpec("double", "crop_std"),
                      ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=None, outputs=outputs, params=ParamSchema([ParamSpec("on_error", "string",
                                                                                      "reject")]))


def requirements() -> list[str]:
    """Pinned versions of what scoring imports (qfm itself is installed from the project)."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def log_scorer(checkpoint: str | Path, example_image: str | Path, name: str = "model") -> ModelInfo:
    """Log best.safetensors (and its checksum) and its ONNX export as a pyfunc model in the active run, with the
    signature and one image (base64, as a client sends it) as the input example; returns MLflow's ModelInfo."""
    from qfm.export import ONNX_FILE, export_model

    checkpoint = Path(checkpoint)
    with tempfile.TemporaryDirectory(prefix="qfm-ckpt-") as tmp:
        folder = Path(tmp) / ARTIFACT
        folder.mkdir()
        for file in (checkpoint, checkpoint.with_name(checkpoint.name + ".sha256")):
            shutil.copy2(file, folder / file.name.replace(checkpoint.name, "best.safetensors"))
        try:
            export_model(folder, "onnx", folder / ONNX_FILE)
        except QfmError as exc:  # a model without an ONNX form still registers; it serves on torch only
            _log.warning("registering without %s: %s", ONNX_FILE, exc)
        example = pd.DataFrame({"image": [base64.b64encode(Path(example_image).read_bytes()).decode()]})
        code = Path(__file__).with_name("model_code.py")  # models from code: no pickled object in the model
        return mlflow.pyfunc.log_model(name=name, python_model=str(code), artifacts={ARTIFACT: str(folder)},
                                       signature=signature(), input_example=example,
                                       pip_requirements=requirements())
