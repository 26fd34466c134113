"""Training checkpoints: atomic writes (temp file, fsync, rename) and a checksum that refuses partial files.

A checkpoint is ``DIR/<name>.pt`` plus ``DIR/<name>.pt.sha256``. A write puts both into temporary files
(fsynced), renames the data into place, then the checksum. A kill before the first rename leaves the
previous checkpoint; a kill between the two renames leaves the new data beside the old checksum and the
new checksum still under its temporary name: the loader finds that temporary checksum, sees that it
matches, finishes the rename and loads the new checkpoint. Anything else that does not match is refused,
never loaded. On S3 (see qfm.storage.staging) the object's own sha256 metadata plays the same part.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qfm.errors import DataError
from qfm.faults import pause_point

LAST = "last.pt"
BEST = "best.pt"
SIDECAR = ".sha256"


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
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
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
    """Read a checkpoint after verifying its checksum; a partial or corrupt file is refused, never loaded."""
    path = Path(path)
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
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as exc:
        raise DataError(f"checkpoint {path} cannot be read ({exc})") from exc


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
