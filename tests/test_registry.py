"""Registry and gated promotion against a real `mlflow server` on 127.0.0.1: registration with a signature
and input example, a promotion that happens, one refused for a worse model, loading models:/NAME@champion,
unknown models and aliases. Also holds the session helpers the serving and DVC tests share."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from qfm.config import PromoteParams, RunParams, StudentParams, TrackingParams
from qfm.errors import ConfigError, QfmError
from qfm.registry.gate import decide

BIN = Path(sys.executable).parent
MODEL = "qfm-iqm-test"
RUN = RunParams(device="cpu")
TINY_STUDENT = StudentParams(epochs=2, batch_size=4, n_crops=2, crop_size=96, test_grid="1x2", workers=0, qcc=False,
                             use_pseudo_labels=False)
_SHARED: dict = {}  # session objects shared by the test modules that import these helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Poll url until it answers 200; fail with the process log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A server in its own process group (stopped by `stop`, by that group id only)."""
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ | (env or {}))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def mlflow_server(tmp_root: Path, wait: bool = True) -> str:
    """A real tracking server (SQLite backend, proxied artifacts) for the whole session; returns its URL.
    wait=False only starts it (it takes seconds to come up: callers overlap that with other work)."""
    if "server" not in _SHARED or _SHARED["server"][0].poll() is not None:  # none yet, or stopped by a module
        _SHARED.pop("registered", None)  # registrations lived in the stopped server's store
        _SHARED["servers_started"] = _SHARED.get("servers_started", 0) + 1
        folder = tmp_root / f"mlflow-server-{_SHARED['servers_started']}"  # a fresh store: no state carried over
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                      "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port",
                      str(port), "--workers", "1"], folder / "server.log",
                     env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"})
        _SHARED["server"] = (proc, f"http://127.0.0.1:{port}", folder / "server.log")
    proc, url, log = _SHARED["server"]
    if wait:
        wait_http(f"{url}/health", proc, log)
    return url


def stop_server() -> None:
    if "server" in _SHARED:
        stop(_SHARED.pop("server")[0])


@contextmanager
def one_torch_thread():
    """One torch thread (as in test_kfp_components): two spinning OpenMP threads on this shared 2-core box
    made a 3 s tiny training take 60-90 s (measured); the numbers do not depend on it. Session fixtures are
    set up before module ones, so the builders below use this themselves."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def students(tiny_demo: Path, tmp_root: Path) -> dict[str, Path]:
    """Two tiny students on the tiny demo: 'good' (trained) and 'worse' (learning rate 0, untrained head)."""
    if "students" not in _SHARED:
        from qfm.steps.student import train_student

        out = {}
        with one_torch_thread():
            for name, params in (("good", TINY_STUDENT), ("worse", replace(TINY_STUDENT, lr=0.0))):
                out[name] = tmp_root / "students" / name
                train_student(tiny_demo, out[name], params, RUN, progress=False)
        _SHARED["students"] = out
    return _SHARED["students"]


def registered(tiny_demo: Path, tmp_root: Path, url: str) -> dict:
    """Promote worse, then good, then worse again into MODEL on the server; the three results."""
    if "registered" not in _SHARED:
        from qfm.steps.promote import promote

        models = students(tiny_demo, tmp_root)
        tracking = TrackingParams(enabled=True, uri=url, experiment="registry-test", pipeline_run="registry-test")
        results = {}
        with one_torch_thread():
            for step, name in (("first", "worse"), ("better", "good"), ("worse_again", "worse")):
                results[step] = promote(models[name], tiny_demo, tmp_root / "promote" / step,
                                        PromoteParams(model_name=MODEL, margin=0.01), RUN, tracking=tracking,
                                        workers=0, progress=False)
        _SHARED["registered"] = results
    return _SHARED["registered"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def server_started(tmp_path_factory, request) -> None:
    request.addfinalizer(stop_server)
    mlflow_server(tmp_path_factory.getbasetemp(), wait=False)


@pytest.fixture(scope="session")
def trained(server_started, tiny_demo, tmp_path_factory) -> dict[str, Path]:
    return students(tiny_demo, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def server_url(server_started, tmp_path_factory) -> str:
    return mlflow_server(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def promotions(trained, tiny_demo, tmp_path_factory, server_url) -> dict:
    return registered(tiny_demo, tmp_path_factory.getbasetemp(), server_url)


@pytest.fixture
def client(server_url, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    return mlflow.MlflowClient(server_url, registry_uri=server_url)


def test_gate_compares_by_margin_in_the_metric_direction():
    assert decide("srcc", 0.01, 0.80, None).promote
    assert decide("srcc", 0.01, 0.80, 0.78, "3", "dv").promote
    refused = decide("srcc", 0.01, 0.785, 0.78, "3", "dv")
    assert not refused.promote and "champion stays v3" in refused.reason and "0.0050" in refused.reason
    assert decide("rmse_raw", 0.01, 0.10, 0.12, "1").promote          # lower is better
    assert not decide("rmse_raw", 0.01, 0.12, 0.10, "1").promote
    with pytest.raises(ConfigError, match="promote.metric 'accuracy'"):
        decide("accuracy", 0.01, 0.5, 0.4)
    with pytest.raises(ConfigError, match="promote.margin"):
        decide("srcc", -0.1, 0.5, 0.4)


def test_promotion_happens_and_a_worse_model_is_refused(promotions, trained, client, tmp_path_factory):
    first, better, again = promotions["first"], promotions["better"], promotions["worse_again"]
    assert first["promoted"] and first["version"] == 1 and "no champion yet" in first["reason"]
    assert better["promoted"] and better["version"] == 2 and better["previous_champion"] == 1
    assert better["challenger_val"] - better["champion_val"] > 0.01
    summary = json.loads((trained["good"] / "summary.json").read_text())
    assert better["challenger_val"] == pytest.approx(summary["val"]["srcc"])  # the same test on the same val part
    # the worse checkpoint again: its version is reused (no duplicate), it is challenger, the champion stays
    assert again["version"] == 1 and again["reused_version"] and not again["promoted"]
    assert again["champion_version"] == 2 and again["reason"].startswith("refused:")
    model = client.get_registered_model(MODEL)
    assert model.aliases == {"champion": "2", "challenger": "1"}
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2
    worse = client.get_model_version(MODEL, "1")
    assert worse.status == "READY" and worse.tags["qfm.promotion"] == again["reason"]
    good = client.get_model_version(MODEL, "2")
    assert float(good.tags["qfm.val_srcc"]) == pytest.approx(better["challenger_val"])
    assert good.tags["qfm.data_version"] == again["data_version"] and len(good.tags["qfm.checkpoint_sha256"]) == 64
    written = json.loads((tmp_path_factory.getbasetemp() / "promote" / "worse_again" / "promotion.json").read_text())
    assert written == again


def test_the_same_promotion_again_adds_no_version_and_no_run(promotions, trained, client, tiny_demo, tmp_path):
    from qfm.steps.promote import promote

    experiment = client.get_experiment_by_name("registry-test").experiment_id
    before = client.search_runs([experiment], "tags.`qfm.step` = 'promote'")
    again = promote(trained["worse"], tiny_demo, tmp_path, PromoteParams(model_name=MODEL, margin=0.01), RUN,
                    tracking=TrackingParams(enabled=True, uri=client.tracking_uri, experiment="registry-test"),
                    workers=0, progress=False)
    assert again == promotions["worse_again"]
    assert len(client.search_runs([experiment], "tags.`qfm.step` = 'promote'")) == len(before) == 3
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2


def test_registered_model_has_signature_and_input_example(promotions, client):
    import mlflow
    from mlflow.models import Model

    version = client.get_model_version_by_alias(MODEL, "champion")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version.version}"))
    meta = Model.load(local / "MLmodel")
    assert meta.signature.inputs is None  # the model checks its columns itself and names a wrong one
    assert meta.signature.outputs.input_names() == ["score", "crop_std", "error"]
    assert [(p.name, p.default) for p in meta.signature.params.params] == [("on_error", "reject")]
    example = json.loads((local / meta.saved_input_example_info["artifact_path"]).read_text())
    assert example["columns"] == ["image"] and base64.b64decode(example["data"][0][0])[:4] == b"\x89PNG"
    assert (local / "artifacts" / "checkpoint" / "best.safetensors.sha256").is_file()
    assert (local / "artifacts" / "checkpoint" / "model.onnx").is_file()


def test_champion_loads_and_scores_paths_and_bytes_like_qfm_score(promotions, trained, client, tiny_demo,
                                                                  monkeypatch):
    """In a Python session as behind a server: `path` rows are read only inside QFM_SERVE_ROOT."""
    import mlflow

    from qfm.steps.score import score_images

    images = sorted((tiny_demo.parent / "demo" / "images").glob("*.png"))[:3]
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    monkeypatch.delenv("QFM_SERVE_ROOT", raising=False)
    with pytest.raises(Exception, match="row 0: this model reads no image files: QFM_SERVE_ROOT is not set"):
        model.predict(pd.DataFrame({"path": [str(images[0])]}))
    monkeypatch.setenv("QFM_SERVE_ROOT", str(images[0].parent))
    by_path = model.predict(pd.DataFrame({"path": [str(p) for p in images] + ["missing.png"]}),
                            params={"on_error": "report"})
    by_bytes = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    good = trained["good"]
    local = score_images(good, images, device="cpu", workers=0, progress=False)
    assert by_path["score"][:3].tolist() == pytest.approx(local["score"].tolist(), abs=1e-6)
    assert by_bytes["score"].tolist() == pytest.approx(local["score"].tolist(), abs=1e-6)
    assert by_path["error"][:3].isna().all() and "missing.png" in by_path["error"][3]
    assert score_images(f"models:/{MODEL}@champion", images, device="cpu", workers=0,
                        progress=False)["score"].tolist() == pytest.approx(local["score"].tolist(), abs=1e-6)


def test_unknown_model_or_alias_is_a_clear_error(promotions, client, capsys):
    from qfm.cli import main
    from qfm.steps.score import score_images

    with pytest.raises(QfmError, match=rf"no registered model 'nope' at http://127.0.0.1.*{MODEL}"):
        score_images("models:/nope@champion", ["x.png"])
    with pytest.raises(QfmError, match=r"has no alias 'champ'.*challenger -> v1, champion -> v2"):
        score_images(f"models:/{MODEL}@champ", ["x.png"])
    with pytest.raises(QfmError, match="no version 9"):
        score_images(f"models:/{MODEL}/9", ["x.png"])
    assert main(["score", "x.png", "--model", f"models:/{MODEL}"]) == 2
    assert "is not a registered-model URI" in capsys.readouterr().err


def test_champion_is_re_evaluated_when_the_data_version_differs(client, trained, tiny_demo, tmp_path):
    """Scores that changed make another data version: the champion's recorded value is not comparable, so
    the gate measures the champion on the challenger's validation part first."""
    from qfm.data.manifest import read_manifest, write_manifest
    from qfm.steps.promote import promote

    manifest = read_manifest(tiny_demo)
    manifest.frame["mos"] = 1.0 - manifest.frame["mos"]  # the same images, other scores
    write_manifest(manifest, tmp_path / "m")
    tracking = TrackingParams(enabled=True, uri=client.tracking_uri, experiment="registry-test")
    models = trained
    params = PromoteParams(model_name=f"{MODEL}-data")
    first = promote(models["good"], tiny_demo, tmp_path / "a", params, RUN, tracking=tracking, workers=0, progress=False)
    second = promote(models["worse"], tmp_path / "m", tmp_path / "b", params, RUN, tracking=tracking, workers=0,
                     progress=False)
    assert second["data_version"] != first["data_version"]
    assert f"registered on data version {first['data_version']}" in second["reason"]
    assert second["champion_val"] == pytest.approx(-first["challenger_val"])  # the good model on reversed scores


def test_registered_onnx_form_scores_like_the_checkpoint(promotions, trained, client, tiny_demo, monkeypatch):
    """QFM_ENGINE=onnxruntime: the version's model.onnx (exported at promotion) scores within 1e-4."""
    import mlflow

    from qfm.steps.score import score_images

    images = sorted((tiny_demo.parent / "demo" / "images").glob("*.png"))[:3]
    monkeypatch.setenv("QFM_ENGINE", "onnxruntime")
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert type(model.unwrap_python_model().model).__name__ == "OnnxRuntimeScorer"
    onnx = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    local = score_images(trained["good"], images, device="cpu", workers=0, progress=False)
    assert onnx["score"].tolist() == pytest.approx(local["score"].tolist(), abs=1e-4)
