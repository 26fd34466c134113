"""`mlflow models serve -m models:/NAME@champion --env-manager local` on a free port answers real HTTP
requests (image paths, base64 image bytes) with the scores `qfm score --model models:/NAME@champion` gives."""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request

import pandas as pd
import pytest
import test_registry as registry
from test_registry import one_thread  # noqa: F401  (autouse: one torch thread)

from qfm.cli import main

MODEL = registry.MODEL


@pytest.fixture(scope="session")
def champion_store(tiny_demo, tmp_path_factory, request) -> str:
    """The tracking server holding the registry tests' model and its champion (shared, built once)."""
    root = tmp_path_factory.getbasetemp()
    request.addfinalizer(registry.stop_server)
    registry.mlflow_server(root, wait=False)
    registry.students(tiny_demo, root)
    url = registry.mlflow_server(root)
    registry.registered(tiny_demo, root, url)
    return url


@pytest.fixture(scope="module")
def served(champion_store, tmp_path_factory):
    """The champion behind `mlflow models serve` (own process group, stopped by its id)."""
    port = registry.free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = registry.start([str(registry.BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], log,
                          env={"MLFLOW_TRACKING_URI": champion_store, "OMP_NUM_THREADS": "1", "QFM_DEVICE": "cpu",
                               "PATH": f"{registry.BIN}{os.pathsep}{os.environ['PATH']}"})  # it execs uvicorn
    try:
        registry.wait_http(f"http://127.0.0.1:{port}/ping", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        registry.stop(proc)


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_served_champion_scores_like_qfm_score(served, champion_store, tiny_demo, monkeypatch, capsys):
    images = sorted((tiny_demo.parent / "demo" / "images").glob("*.png"))[:4]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion_store)
    assert main(["score", *map(str, images), "--model", f"models:/{MODEL}@champion", "--device", "cpu",
                 "--workers", "0", "--quiet"]) == 0
    expected = pd.read_csv(io.StringIO(capsys.readouterr().out))["score"].tolist()

    status, by_path = post(served, {"dataframe_split": {"columns": ["path"], "data": [[str(p)] for p in images]}})
    assert status == 200, by_path
    assert [row["score"] for row in by_path["predictions"]] == pytest.approx(expected, abs=1e-6)

    encoded = [base64.b64encode(p.read_bytes()).decode() for p in images[:2]]
    status, by_bytes = post(served, {"dataframe_records": [{"image": e} for e in encoded]
                                     + [{"image": base64.b64encode(b"not an image").decode()}]})
    assert status == 200, by_bytes
    rows = by_bytes["predictions"]
    assert [r["score"] for r in rows[:2]] == pytest.approx(expected[:2], abs=1e-6)
    assert rows[0]["error"] is None and "cannot decode" in rows[2]["error"]


def test_served_model_rejects_input_without_images(served):
    status, body = post(served, {"dataframe_split": {"columns": ["photo"], "data": [["a.png"]]}})
    assert status >= 400
    assert "'path' column" in json.dumps(body)
