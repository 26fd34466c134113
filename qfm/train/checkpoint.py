"""Training checkpoints: atomic writes (temp file, fsync, rename) and a checksum that refuses partial files.

A checkpoint is ``DIR/<name>.pt`` plus ``DIR/<name>.pt.sha256``; the checksum is written after the data
and renamed into place last, so a kill at any point leaves either the previous complete checkpoint or
the new one, never a half-written file that would be loaded.
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

LAST = "last.pt"
BEST = "best.pt"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint atomically with its checksum sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    _atomic_write(path, data)
    _atomic_write(path.with_name(path.name + ".sha256"), (_sha256(data) + "\n").encode())
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint after verifying its checksum; a partial or corrupt file is refused, never loaded."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    digest_file = path.with_name(path.name + ".sha256")
    data = path.read_bytes()
    if not digest_file.is_file():
        raise DataError(f"checkpoint {path} has no checksum file {digest_file.name}: it may be partial; "
                        "refusing to load it (delete it to start from the previous checkpoint or from scratch)")
    expected = digest_file.read_text().strip()
    if _sha256(data) != expected:
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
