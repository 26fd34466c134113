"""Seeded, content-disjoint train/val/test splits stored as manifest columns (one column per split)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from qfm.errors import ConfigError, DataError

TRAIN, VAL, TEST = "train", "val", "test"
PARTS = (TRAIN, VAL, TEST)


@dataclass(frozen=True)
class SplitProtocol:
    """How the splits were made. test_fraction is of all content; val_fraction is of the train part."""

    n_splits: int = 10
    test_fraction: float = 0.2
    val_fraction: float = 0.125
    seed: int = 2024
    group_by: str = "content_id"

    def __post_init__(self) -> None:
        if self.n_splits < 1:
            raise ConfigError(f"splits.n_splits must be >= 1, got {self.n_splits}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"splits.test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"splits.val_fraction must be in [0, 1), got {self.val_fraction}")

    def as_dict(self) -> dict:
        return asdict(self) | {"columns": split_columns(self.n_splits),
                               "description": "content-disjoint 80/20 train+val/test; val carved from train"}


def split_columns(n_splits: int) -> list[str]:
    """The manifest column names of the splits: split_0 … split_{n-1}."""
    return [f"split_{i}" for i in range(n_splits)]


def make_splits(content_ids: Sequence[str], protocol: SplitProtocol | None = None) -> pd.DataFrame:
    """One column per split, values 'train'/'val'/'test'; no content_id is in two parts of a split."""
    protocol = protocol or SplitProtocol()
    content = pd.Series(list(content_ids), dtype="string")
    groups = np.array(sorted(content.unique()))
    n = len(groups)
    if n < 2:
        raise DataError(f"cannot split a dataset with {n} distinct content_id(s): at least 2 are needed")
    n_test = min(max(1, round(protocol.test_fraction * n)), n - 1)
    columns = {}
    for i, column in enumerate(split_columns(protocol.n_splits)):
        order = np.random.default_rng([protocol.seed, i]).permutation(n)
        test = set(groups[order[:n_test]])
        rest = order[n_test:]
        n_val = min(round(protocol.val_fraction * len(rest)), len(rest) - 1)
        if protocol.val_fraction > 0 and len(rest) >= 2:
            n_val = max(1, n_val)
        val = set(groups[rest[:n_val]])
        columns[column] = [TEST if c in test else VAL if c in val else TRAIN for c in content]
    return pd.DataFrame(columns, index=content.index)


def check_disjoint(frame: pd.DataFrame, column: str, group_by: str = "content_id") -> list[str]:
    """Content ids that appear in more than one part of a split (empty when the split is honest)."""
    parts_per_group = frame.groupby(group_by)[column].nunique()
    return sorted(parts_per_group[parts_per_group > 1].index.astype(str))


def part_mask(frame: pd.DataFrame, column: str, part: str) -> pd.Series:
    """Rows of one part of one split, with a clear error for an unknown split column or part."""
    if column not in frame.columns:
        known = [c for c in frame.columns if c.startswith("split_")]
        raise ConfigError(f"split column '{column}' is not in the manifest; it has {known}")
    if part not in PARTS:
        raise ConfigError(f"split part '{part}' is unknown; use one of {list(PARTS)}")
    return frame[column] == part


def ids_digest(image_ids: Sequence[str]) -> str:
    """SHA-256 of a set of image ids (sorted, so the order does not matter): which images a part holds."""
    return hashlib.sha256(json.dumps(sorted(map(str, image_ids))).encode()).hexdigest()


def part_digest(frame: pd.DataFrame, column: str, part: str) -> str:
    """ids_digest of the images in one part of one split of a manifest's frame."""
    return ids_digest(frame.loc[part_mask(frame, column, part), "image_id"].astype(str).tolist())
