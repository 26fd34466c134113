"""Dataset adapters: one per published layout, each reads the release as-is into a RawDataset.

Add an adapter by decorating ``read(root: Path, **options) -> RawDataset`` with ``@register(name, ...)``
in a module of this package and importing that module below.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qfm.data.manifest import RawDataset
from qfm.errors import ConfigError, DataError


@dataclass(frozen=True)
class Adapter:
    name: str
    description: str
    read: Callable[..., RawDataset]
    synthetic: bool


ADAPTERS: dict[str, Adapter] = {}


def register(name: str, description: str, synthetic: bool = False):
    """Register an adapter function under a format name (used by `qfm ingest --format NAME`)."""

    def wrap(fn: Callable[..., RawDataset]) -> Callable[..., RawDataset]:
        ADAPTERS[name] = Adapter(name=name, description=description, read=fn, synthetic=synthetic)
        return fn

    return wrap


def get_adapter(name: str) -> Adapter:
    """The adapter for a format name; an unknown name lists the close matches and every known name."""
    key = name.strip().lower()
    if key in ADAPTERS:
        return ADAPTERS[key]
    close = difflib.get_close_matches(key, list(ADAPTERS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown dataset format '{name}'.{hint} Known formats: {', '.join(sorted(ADAPTERS))}")


def read_dataset(name: str, root: str | Path, **options) -> RawDataset:
    """Read a dataset release with the named adapter, after checking that its root exists."""
    adapter = get_adapter(name)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    return adapter.read(root, **options)


def require_file(root: Path, relative: str, what: str) -> Path:
    """A file the layout must have, or a DataError naming it and the dataset."""
    path = root / relative
    if not path.is_file():
        raise DataError(f"{what}: expected file {path} is missing; is --root the top folder of the release?")
    return path


def require_columns(columns, needed: list[str], file: Path) -> None:
    """Fail naming the file, the missing columns and the columns that are there."""
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{file}: missing column(s) {missing}; found {list(columns)}")


# Adapter modules register themselves on import.
for _module in ("authentic", "synthetic", "csv_generic"):
    importlib.import_module(f"{__name__}.{_module}")
