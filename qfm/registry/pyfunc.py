"""The MLflow pyfunc flavour of a trained qfm model: a DataFrame of images in, one score per row out.

Input columns (one of them per row): `image`, the encoded file's bytes (base64 text in a JSON request), or
`path`, an image file the model can read. Output columns: `score` (0-1, higher = better, the deterministic
multi-crop test of `qfm score`), `crop_std`, `error` (None, or why the row's image could not be scored).
Scoring is qfm.inference's, as for `qfm score`, so `mlflow models serve` and `qfm score` give the same
numbers. The model's artifact is a folder with the checkpoint (best.safetensors and its checksum) and, when the model
could be exported, its ONNX form (model.onnx): `QFM_ENGINE=onnxruntime` scores with that instead of torch, and
then loading and scoring import no torch (decoding and cropping are numpy's), so a server needs none.

A request is checked before anything is decoded, and every refusal is an HTTP 400 whose message names the
row and the problem, never a stack trace or a server path: columns other than these two, no rows, more rows
than `QFM_SERVE_MAX_ROWS`, more image bytes than `QFM_SERVE_MAX_BYTES`, more pixels in all than
`QFM_SERVE_MAX_PIXELS` (read from the images' headers: nothing is decoded first), bytes that are not a JPEG,
PNG, BMP, TIFF or WebP image, an image over PIL's decompression-bomb limit, a damaged file. `path` rows are
read only inside the folder `QFM_SERVE_ROOT` names (symlinks and `..` resolved first), whoever hosts the
model (`mlflow models serve`, MLServer, KServe, a Python session): with it unset no path is read at all,
and a path that is missing, outside the folder, not a file or not a readable image gets one and the same
answer, so that a client cannot learn which files exist. By default one bad row refuses the whole request;
the request parameter `on_error: report` scores the others and gives the bad rows an `error` instead (the
caps on rows, bytes and pixels refuse the request either way).
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

from qfm.data.images import ALLOWED_NAMES, decode_limit, open_image
from qfm.errors import ConfigError, QfmError

if TYPE_CHECKING:
    from torch import nn

    from qfm.onnx_engine import OnnxRuntimeScorer

ARTIFACT = "checkpoint"
DEVICE_ENV = "QFM_DEVICE"           # device of a served model (default auto: CUDA when present)
ENGINE_ENV = "QFM_ENGINE"           # torch (default) | onnxruntime (the model.onnx registered with the version)
SERVE_ROOT_ENV = "QFM_SERVE_ROOT"   # the folder `path` rows may name files in (unset: no path is read)
LIMITS = {  # a request's caps: (environment variable, default, what is counted)
    "rows": ("QFM_SERVE_MAX_ROWS", 32, "rows"),
    "bytes": ("QFM_SERVE_MAX_BYTES", 64 * 2**20, "bytes of image files"),
    "pixels": ("QFM_SERVE_MAX_PIXELS", 100_000_000, "pixels (width x height, summed over the images)"),
}
COLUMNS = ("image", "path")
ON_ERROR = ("reject", "report")
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pyarrow", "pillow", "scipy",
                "matplotlib", "tqdm", "pyyaml", "onnxruntime")
_log = logging.getLogger(__name__)


class QfmScorer(mlflow.pyfunc.PythonModel):
    """Loads the model once (torch checkpoint or ONNX export); predict scores a DataFrame of images, one
    request at a time: the model already uses every core, and concurrent requests (the scoring server runs
    each in a thread) would only oversubscribe them. That one lock is why a request is capped (rows, image
    bytes, pixels: LIMITS, read once at load): the largest request the caps let through holds the lock for
    a bounded time (about QFM_SERVE_MAX_ROWS images' scoring), and one over them is refused before anything
    is decoded, so it never holds the lock at all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.limits: dict[str, int] | None = None

    def load_context(self, context) -> None:
        from qfm.inference import load_engine_model

        self.limits = read_limits()  # a bad setting stops the server at start, naming the variable
        folder = Path(context.artifacts[ARTIFACT])
        engine = os.environ.get(ENGINE_ENV, "torch")
        self.model, self.state, self.device = load_engine_model(folder, engine, os.environ.get(DEVICE_ENV, "auto"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            with self.lock:
                return score_frame(self.model, self.state, model_input, device=self.device,
                                   on_error=(params or {}).get("on_error", "reject"), limits=self.limits)
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


def read_limits() -> dict[str, int]:
    """The caps of a request by name (LIMITS): each from its environment variable, else its default."""
    limits = {}
    for name, (variable, default, _) in LIMITS.items():
        value = os.environ.get(variable, "").strip()
        try:
            limits[name] = int(value) if value else default
        except ValueError:
            raise ConfigError(f"{variable}={value!r} is not a whole number; unset it for the default {default}") \
                from None
        if limits[name] < 1:
            raise ConfigError(f"{variable} must be at least 1, got {limits[name]}; unset it for the default {default}")
    return limits


def over_limit(name: str, count: int, limits: dict[str, int]) -> None:
    """Refuse the whole request (HTTP 400) when count exceeds the named cap, naming the cap and its variable."""
    if count > limits[name]:
        variable, _, what = LIMITS[name]
        raise bad_request(f"the request has {count} {what}; this server takes at most {limits[name]} per request "
                          f"({variable}): send fewer or smaller images per request")


def check_request(frame: pd.DataFrame, on_error: str, limits: dict[str, int] | None = None) -> None:
    """Refuse a request that is not a non-empty table of `image` or `path` rows, naming what it got, or that
    has more rows than the cap."""
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
    over_limit("rows", len(frame), limits or read_limits())


def score_frame(model: nn.Module | OnnxRuntimeScorer, state: dict, frame: pd.DataFrame, *, device: str = "auto",
                batch_size: int = 16, on_error: str = "reject", limits: dict[str, int] | None = None) -> pd.DataFrame:
    """Score each row's image (bytes in `image`, else the file in `path`); rows keep their order. A row that
    cannot be scored refuses the request (on_error='reject') or gets its reason in `error` ('report'); a
    request over a cap (limits, default read_limits()) is refused whole, before any image is decoded."""
    from qfm.inference import score_files

    limits = limits or read_limits()
    check_request(frame, on_error, limits)
    n = len(frame)
    paths = frame["path"].tolist() if "path" in frame.columns else [None] * n
    blobs = frame["image"].tolist() if "image" in frame.columns else [None] * n
    notes: dict[int, str] = {}
    sources: dict[int, Path | object] = {}  # a path row's file, or an image row's bytes (still base64 text)
    for i, (path, blob) in enumerate(zip(paths, blobs)):
        try:
            if _present(blob):
                sources[i] = blob
            elif _present(path):
                sources[i] = readable_path(str(path), i)
            else:
                raise QfmError(f"row {i} has neither an 'image' nor a 'path'")
        except QfmError as exc:
            notes[i] = str(exc)
    over_limit("bytes", sum(_size(source) for source in sources.values()), limits)  # nothing decoded yet
    with tempfile.TemporaryDirectory(prefix="qfm-score-") as tmp:
        files: dict[int, Path] = {}
        pixels = 0
        for i, source in sources.items():
            try:
                if isinstance(source, Path):
                    files[i] = source
                else:
                    files[i] = Path(tmp) / f"row_{i}"
                    files[i].write_bytes(_as_bytes(source, i))
                pixels += header_pixels(files[i], i, _path_label(paths[i]) if isinstance(source, Path) else None)
            except QfmError as exc:
                notes[i] = str(exc)
        good = [i for i in range(n) if i not in notes]
        over_limit("pixels", pixels, limits)  # from the headers: nothing decoded yet
        if good:
            scored = score_files(model, state, [files[i] for i in good], device=device, batch_size=batch_size,
                                 workers=0, progress=False)
        out = pd.DataFrame({"score": float("nan"), "crop_std": float("nan"), "error": None}, index=range(n))
        if good:
            out.loc[good, ["score", "crop_std"]] = scored[["score", "crop_std"]].to_numpy()
            for row, error in zip(good, scored["error"]):
                if error and isinstance(sources[row], Path):
                    notes[row] = _unreadable(_path_label(paths[row]), row)
                elif error:
                    label = f"row {row}'s image"
                    notes[row] = f"row {row}: {_client_reason(error, files[row], label)}"
    for row, note in notes.items():
        out.loc[row, "error"] = note
    if notes and on_error == "reject":
        listed = "; ".join(notes[row] for row in sorted(notes)[:5])
        more = f" (and {len(notes) - 5} more)" if len(notes) > 5 else ""
        raise bad_request(f"{len(notes)} of {n} rows cannot be scored: {listed}{more}. Fix them, or send "
                          "params {\"on_error\": \"report\"} to score the other rows")
    return out


def readable_path(path: str, row: int) -> Path:
    """The file a `path` row names, if the model may read it: a regular file inside $QFM_SERVE_ROOT once
    symlinks and `..` are resolved (a relative path is taken inside it), whoever hosts the model; with the
    variable unset no path is read. Every refusal but the unset variable is one message (see _unreadable)."""
    root = os.environ.get(SERVE_ROOT_ENV, "").strip()
    if not root:
        raise QfmError(f"row {row}: this model reads no image files: {SERVE_ROOT_ENV} is not set. Send the image's "
                       f"bytes in an 'image' column (the server's operator can allow paths inside one folder by "
                       f"setting {SERVE_ROOT_ENV} to it)")
    try:
        base = Path(root).resolve()
        resolved = (base / path).resolve()
        if resolved.is_relative_to(base) and resolved.is_file():
            return resolved
    except (OSError, RuntimeError, ValueError):  # a NUL byte, a symlink loop, a name too long
        pass
    raise QfmError(_unreadable(_path_label(path), row))


def _unreadable(label: str, row: int) -> str:
    """The one answer for a path that is missing, outside the folder, not a file or not a readable image."""
    return (f"row {row}: path '{label}' is not an image this server can read; send the path of a JPEG, PNG, BMP, "
            f"TIFF or WebP file inside the folder it serves ({SERVE_ROOT_ENV}; relative paths are taken inside it), "
            "or the image's bytes in an 'image' column")


def _path_label(path) -> str:
    """A path as the client sent it, cut short for a message."""
    text = str(path)
    return text if len(text) <= 200 else text[:200] + "..."


def header_pixels(path: Path, row: int, path_label: str | None = None) -> int:
    """width x height from the image's header alone (nothing decoded): refuse a file that is not an image of
    an accepted format or is over the decoding limit (qfm.data.images.open_image). path_label: the path the
    client sent, for a `path` row (any failure but the size is then the one _unreadable answer)."""
    try:
        with open_image(path) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # PIL refuses at twice its limit, open_image at the limit
        pixels = re.search(r"\((\d+) pixels\)|= (\d+) pixels", str(exc))
        size = f"{pixels[1] or pixels[2]} pixels" if pixels else "over the limit"
        raise QfmError(f"row {row}: the image is too large to decode ({size}; the limit is {decode_limit()} "
                       "pixels per image); send a reduced copy") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        if path_label is not None:
            raise QfmError(_unreadable(path_label, row)) from None
        raise QfmError(f"row {row}: not an image file of an accepted format ({ALLOWED_NAMES})") from None
    return width * height


def _size(source) -> int:
    """Bytes of a row's image: its file's size, or its bytes (base64 text: 3 bytes per 4 characters)."""
    if isinstance(source, Path):
        return source.stat().st_size
    if isinstance(source, str):
        return len(source) * 3 // 4
    return len(source)


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
