"""Shared fixtures: a tiny demo dataset, ingested once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from qfm.data.adapters import read_dataset
from qfm.data.demo import make_demo
from qfm.data.manifest import build_manifest, write_manifest
from qfm.data.splits import SplitProtocol


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on a busy 2-core machine, two spinning OpenMP threads made a
    4-crop forward take 2.5 s instead of 0.02 s and a 1 s epoch take 20-40 s (measured); no result
    depends on the thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A 6-reference demo (2 levels, 128 px) ingested with 2 splits; returns the manifest folder."""
    root = tmp_path_factory.mktemp("tiny-demo")
    make_demo(root / "demo", seed=0, n_references=6, n_scenes=0, n_levels=2, pool_levels=1, image_size=128, progress=False)
    manifest = build_manifest(read_dataset("demo", root / "demo"),
                              SplitProtocol(n_splits=2, test_fraction=0.2, val_fraction=0.25), progress=False)
    write_manifest(manifest, root / "manifest")
    return root / "manifest"


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A real S3 endpoint for the session: moto_server on 127.0.0.1 (tests/s3_server.py)."""
    from s3_server import MotoServer

    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def s3_env(moto_s3, monkeypatch, tmp_path) -> dict[str, str]:
    """AWS settings that point boto3, DVC and MLflow at moto (and nowhere else); returns them."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": moto_s3.url, "MLFLOW_S3_ENDPOINT_URL": moto_s3.url,
           "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"), "AWS_EC2_METADATA_DISABLED": "true"}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
