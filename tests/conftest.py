"""Shared fixtures: a tiny demo dataset, ingested once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from qfm.data.adapters import read_dataset
from qfm.data.demo import make_demo
from qfm.data.manifest import build_manifest, write_manifest
from qfm.data.splits import SplitProtocol


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A 6-reference demo (2 levels, 128 px) ingested with 2 splits; returns the manifest folder."""
    root = tmp_path_factory.mktemp("tiny-demo")
    make_demo(root / "demo", seed=0, n_references=6, n_levels=2, pool_levels=1, image_size=128, progress=False)
    manifest = build_manifest(read_dataset("demo", root / "demo"),
                              SplitProtocol(n_splits=2, test_fraction=0.2, val_fraction=0.25), progress=False)
    write_manifest(manifest, root / "manifest")
    return root / "manifest"
