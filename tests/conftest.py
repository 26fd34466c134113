"""Shared fixtures: a tiny demo dataset, ingested once per test session; how pytest-xdist's workers share
the modules out (scripts/test.sh runs `-n 2 --dist loadfile --no-loadscope-reorder`)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # set before torch is imported: the workers share the cores
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest

from qfm.data.adapters import read_dataset
from qfm.data.demo import make_demo
from qfm.data.manifest import build_manifest, write_manifest
from qfm.data.splits import SplitProtocol

# Modules that share session state (test_registry's trained students and the models registered on its server;
# the tiny_teacher fixture below): one worker runs them together, so those are made once.
GROUPS = {"test_serving": "test_registry", "test_method_fixes": "test_training"}  # + tiny_teacher
# The slowest modules first (end-to-end runs, servers, subprocesses; measured with --durations): the workers
# then end together instead of one running a long module alone at the end. The others keep their order.
SLOWEST_FIRST = ("test_study_pipeline", "test_kfp_pipeline", "test_dvc_pipeline", "test_distributed",
                 "test_trainjob", "test_study", "test_registry", "test_faults", "test_training",
                 "test_kfp_components", "test_export", "test_demo", "test_tracking", "test_s3",
                 "test_cli_training", "test_cli")


def _module(nodeid: str) -> str:
    """The test module's name, or its group's (GROUPS), of a node id such as tests/test_x.py::test_y."""
    name = Path(nodeid.split("::", 1)[0]).stem
    return GROUPS.get(name, name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, each worker collects the slowest modules first (the order it is handed them in).
    A run without xdist keeps pytest's order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
        position = {item.nodeid: index for index, item in enumerate(items)}
        items.sort(key=lambda item: (rank.get(_module(item.nodeid), len(rank)), position[item.nodeid]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` with GROUPS' modules as one unit, and a module handed to a worker only when it is
    down to its last test (xdist's default hands the next one over two tests early, so a worker that is
    still in a long test can hold a module the other, idle, worker would have run)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _module(nodeid)

        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 1:  # 1: a worker runs a test once it has the next
                return
            self._assign_work_unit(node)

    return ModuleGroups(config, log)


# The tiny training recipe of test_training and test_method_fixes, whose teacher (tiny_teacher) they share.
TINY_TRAINING = {"epochs": 1, "batch_size": 4, "n_crops": 1, "crop_size": 96, "test_grid": "1x2", "workers": 0,
                 "warmup_epochs": 0.5, "lr": 5e-4}


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block (see one_torch_thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on a busy 2-core machine, two spinning OpenMP threads made a
    4-crop forward take 2.5 s instead of 0.02 s and a 1 s epoch take 20-40 s (measured); no result
    depends on the thread count."""
    with torch_threads(1):
        yield


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
def tiny_teacher(tiny_demo, tmp_path_factory) -> tuple[Path, dict]:
    """A teacher trained once on tiny_demo (TINY_TRAINING, split_0, CPU): its folder and summary. Tests read
    it or copy it; none writes into it."""
    from qfm.config import RunParams, TrainParams
    from qfm.steps.teacher import train_teacher

    out = tmp_path_factory.mktemp("tiny-teacher")
    with torch_threads(1):  # session fixtures are set up before a module's one_torch_thread
        summary = train_teacher(tiny_demo, out, TrainParams(**TINY_TRAINING), RunParams(split="split_0", device="cpu"),
                                progress=False)
    return out, summary


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

