"""params.yaml: one section per pipeline stage, checked against a schema (unknown keys and wrong types
are rejected with the key named)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qfm.errors import ConfigError


@dataclass(frozen=True)
class DemoParams:
    seed: int = 0


@dataclass(frozen=True)
class IngestParams:
    format: str = "demo"
    root: str = "artifacts/demo"
    options: dict = field(default_factory=dict)
    skip_invalid: bool = False


@dataclass(frozen=True)
class SplitParams:
    n_splits: int = 10
    test_fraction: float = 0.2
    val_fraction: float = 0.125
    seed: int = 2024


@dataclass(frozen=True)
class ValidateParams:
    min_width: int = 224
    min_height: int = 224


SECTIONS: dict[str, type] = {
    "demo": DemoParams,
    "ingest": IngestParams,
    "splits": SplitParams,
    "validate": ValidateParams,
}


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    base = origin or annotation
    return isinstance(value, base)


def parse_section(name: str, data: dict | None, source: str = "params.yaml") -> Any:
    """Build one section's dataclass from a mapping; unknown keys or wrong types raise ConfigError."""
    cls = SECTIONS[name]
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{name}.{key}'{hint}; allowed: {sorted(fields)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: '{name}.{key}' must be {getattr(hints[key], '__name__', hints[key])}, "
                              f"got {value!r} ({type(value).__name__})")
    return cls(**data)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Every known section of a params file, validated; missing sections take their defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameters file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of stage sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known sections: {sorted(SECTIONS)}")
    return {name: parse_section(name, raw.get(name), str(path)) for name in SECTIONS}
