"""Reading MATLAB .mat score files as released (v5 via scipy; v7.3/HDF5 gets a clear error)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from qfm.errors import DataError


def load_mat_variable(path: Path, key: str) -> np.ndarray:
    """One variable of a .mat file, or a DataError naming the file and the keys it does have."""
    try:
        content = scipy.io.loadmat(path)
    except (ValueError, OSError, NotImplementedError) as exc:
        raise DataError(f"{path}: not a readable MATLAB v5 .mat file ({exc})") from exc
    if key not in content:
        keys = sorted(k for k in content if not k.startswith("__"))
        raise DataError(f"{path}: no variable '{key}'; it holds {keys}")
    return content[key]


def mat_strings(array: np.ndarray) -> list[str]:
    """A MATLAB cell array of strings (any shape) flattened to Python strings, in order."""
    out = []
    for item in array.ravel(order="F"):
        value = item
        while isinstance(value, np.ndarray):
            value = value.ravel()[0] if value.size else ""
        out.append(str(value))
    return out


def mat_numbers(array: np.ndarray) -> np.ndarray:
    """A MATLAB numeric row/column vector as a flat float array."""
    return np.asarray(array, dtype=float).ravel(order="F")
