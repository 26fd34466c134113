"""Training checkpoints without pickle: atomic writes (temp file, fsync, rename) and a checksum that refuses
partial files.

A checkpoint is one safetensors file, ``DIR/<name>.safetensors``: every tensor of the state (model weights,
optimizer moments, RNG states) is a safetensors tensor, and everything else (recipe, crop settings, epoch,
metrics, history, the structure that puts the tensors back in place) is JSON in the file's header
(``__metadata__["qfm"]``). Loading parses JSON and raw tensors only: nothing is unpickled, so a checkpoint
from S3 or the registry cannot run code. A pickled ``.pt`` from an older qfm is refused with the command
that converts it (``qfm convert``, see ``convert_checkpoint``).

Beside it, ``DIR/<name>.safetensors.sha256``. A write puts both into temporary files
(fsynced), renames the data into place, then the checksum. A kill before the first rename leaves the
previous checkpoint; a kill between the two renames leaves the new data beside the old checksum and the
new checksum still under its temporary name: the loader finds that temporary checksum, sees that it
matches, finishes the rename and loads the new checkpoint. Anything else that does not match is refused,
never loaded. On S3 (see qfm.storage.staging) the object's own sha256 metadata plays the same part.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from qfm.errors import DataError
from qfm.faults import pause_point

LAST = "last.safetensors"
BEST = "best.safetensors"
SIDECAR = ".sha256"
LEGACY_SUFFIX = ".pt"  # pickled checkpoints of earlier qfm versions: converted by `qfm convert`, never loaded
HEADER_KEY = "qfm"     # the safetensors metadata entry holding the JSON of everything but the tensors
_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_dir(folder: Path) -> None:
    """Make renames in a folder durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint atomically with its checksum sidecar (see the module docstring for the order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_name(path.name + SIDECAR)
    for stale in (*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{sidecar.name}.tmp-*")):
        stale.unlink(missing_ok=True)  # left by a writer killed earlier
    data = encode_state(state)
    tmp_data, tmp_sidecar = _temp(path), _temp(sidecar)
    _write_synced(tmp_data, data)
    _write_synced(tmp_sidecar, (_sha256(data) + "\n").encode())
    pause_point(f"write:{path.name}:tmp-written")
    os.replace(tmp_data, path)
    pause_point(f"write:{path.name}:renamed")
    os.replace(tmp_sidecar, sidecar)
    _sync_dir(path.parent)
    return path


def _finish_interrupted_write(path: Path, digest: str) -> bool:
    """A write killed between its two renames leaves the new checksum under a temporary name: if one matches
    the data, complete the rename and say so."""
    sidecar = path.with_name(path.name + SIDECAR)
    for pending in path.parent.glob(f".{sidecar.name}.tmp-*"):
        if pending.read_text().strip() == digest:
            os.replace(pending, sidecar)
            return True
    return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint after verifying its checksum; a partial or corrupt file is refused, never loaded, and
    so is a pickled one (it names the conversion command)."""
    path = Path(path)
    return _to_device(decode_checkpoint(read_checkpoint_bytes(path), path), torch.device(map_location))


def decode_checkpoint(data: bytes, path: str | Path) -> dict[str, Any]:
    """A verified checkpoint's bytes (read_checkpoint_bytes) as its state; `path` names it in errors."""
    try:
        return decode_state(data)
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as exc:
        raise DataError(f"checkpoint {path} cannot be read as a qfm safetensors checkpoint ({exc})") from exc


def read_checkpoint_bytes(path: str | Path) -> bytes:
    """A checkpoint file's bytes once its checksum matches (see load_checkpoint, which decodes them)."""
    path = Path(path)
    if path.suffix == LEGACY_SUFFIX or (not path.exists() and path.with_suffix(LEGACY_SUFFIX).is_file()):
        legacy = path if path.suffix == LEGACY_SUFFIX else path.with_suffix(LEGACY_SUFFIX)
        raise DataError(legacy_message(legacy))
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    digest_file = path.with_name(path.name + SIDECAR)
    data = path.read_bytes()
    actual = _sha256(data)
    expected = digest_file.read_text().strip() if digest_file.is_file() else None
    if expected != actual and _finish_interrupted_write(path, actual):
        expected = actual
    if expected is None:
        raise DataError(f"checkpoint {path} has no checksum file {digest_file.name}: it may be partial; "
                        "refusing to load it (delete it to start from the previous checkpoint or from scratch)")
    if actual != expected:
        raise DataError(f"checkpoint {path} is corrupt or partial (checksum mismatch: {len(data)} bytes); "
                        "refusing to load it (delete it to start from the previous checkpoint or from scratch)")
    return data


def legacy_message(path: Path) -> str:
    """The one-line answer to a pickled checkpoint of an earlier qfm: how to convert it."""
    return (f"checkpoint {path} is a pickled PyTorch file of an earlier qfm; qfm loads only safetensors "
            f"checkpoints (no code can run on loading). Convert it once: qfm convert {path}")


def model_path(model_ref: str | Path) -> Path:
    """A trained model's checkpoint: the file given, or the selected model of a training step's output
    folder; a DataError naming what is missing, or how to convert the pickled best.pt of an earlier qfm."""
    ref = Path(model_ref)
    if ref.is_file():
        return ref
    if not ref.exists():
        raise DataError(f"no trained model at {ref}: it does not exist; pass a trained model folder (holding "
                        f"{BEST}) or the checkpoint file")
    path = ref / BEST
    if not path.is_file():
        legacy = path.with_suffix(LEGACY_SUFFIX)
        if legacy.is_file():
            raise DataError(legacy_message(legacy))
        raise DataError(f"no trained model at {path}: run the training step that writes {ref} first")
    return path


def encode_state(state: dict[str, Any]) -> bytes:
    """A checkpoint's bytes: the state's tensors and arrays as safetensors, the rest as JSON in the header."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "state")
    return save_tensors(tensors, metadata={HEADER_KEY: json.dumps(skeleton)})


def decode_state(data: bytes) -> dict[str, Any]:
    """encode_state's inverse, from raw bytes: JSON and tensors only."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    skeleton = json.loads(header["__metadata__"][HEADER_KEY])
    return _decode(skeleton, load_tensors(data))


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-able form of a state value; tensors and arrays move into `tensors` and leave a reference."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()  # own memory: safetensors refuses shared storage
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        widened = value.astype(np.int64) if value.dtype.kind in "iu" else value  # torch lacks some unsigned types
        tensors[key] = torch.from_numpy(np.ascontiguousarray(widened)).clone()
        return {_ARRAY: key, "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {_ITEMS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                         for k, v in value.items()]}
    raise DataError(f"checkpoint value {where} is a {type(value).__name__}: a checkpoint holds tensors, arrays, "
                    "numbers, strings, lists, tuples and dicts only")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _ARRAY in value:
        return tensors[value[_ARRAY]].numpy().astype(np.dtype(value["dtype"]))
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _to_device(value: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def numpy_globals() -> list:
    """NumPy arrays and scalars, allowed by torch.load(weights_only=True) alongside tensors."""
    from numpy._core.multiarray import _reconstruct, scalar

    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


def convert_checkpoint(source: str | Path, out: str | Path | None = None, trust: bool = False) -> Path:
    """A pickled checkpoint of an earlier qfm, rewritten as a safetensors checkpoint (default: beside it, as
    .safetensors). The pickle is read with torch's weights-only loader (tensors, NumPy arrays and plain
    values; anything that could run code is refused) unless trust=True, for a file you made yourself."""
    import pickle

    source = Path(source)
    if not source.is_file():
        raise DataError(f"{source} does not exist: give the pickled checkpoint (e.g. artifacts/student/best.pt)")
    out = Path(out) if out is not None else source.with_suffix(".safetensors")
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            state = torch.load(source, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line),
                      str(exc).splitlines()[0])
        raise DataError(f"{source} holds objects that torch's weights-only loader refuses ({reason}): it was not "
                        "converted, and nothing in it ran. If you made this file yourself and trust it, "
                        "qfm convert --trust unpickles it fully") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise DataError(f"{source} is not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise DataError(f"{source} holds a {type(state).__name__}, not a checkpoint dict")
    return save_checkpoint(state, out)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, for exact resumption."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
