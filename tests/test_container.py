"""The project image, built and run here: `qfm --version` names the commit, the whole demo DAG runs with every
step in the image (kfp.local's DockerRunner through podman's Docker API) against MLflow and S3 on the host,
with the SubprocessRunner's test metrics, and the image scores the demo images as this environment does.

Opt-in, being heavy: QFM_CONTAINER_TESTS=1 (needs podman able to run containers; the
first build downloads and installs several GB: see docs/kubeflow.md).
QFM_CONTAINER_IMAGE=NAME:TAG runs an image already built instead of running scripts/build_image.sh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_kfp_components import TINY
from test_registry import free_port, start, stop, wait_http

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = {"ingest", "validate", "train-teacher", "pseudo-label", "build-bank", "train-student", "evaluate", "promote"}
METRIC_TOLERANCE = 1e-6  # absolute, on every test metric: the same code and wheels on the same CPU
SCORE_TOLERANCE = 1e-5

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("QFM_CONTAINER_TESTS") != "1",
                                 reason="container tests are opt-in (heavy): set QFM_CONTAINER_TESTS=1")]


@pytest.fixture(scope="module")
def engine() -> dict[str, str]:
    """podman's settings (scripts/podman/containers.conf), or skip when no container engine runs here."""
    if shutil.which("podman") is None:
        pytest.skip("no container engine: podman is not installed (apt-get install podman runc)")
    env = os.environ | {"CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                                          str(REPO / "scripts" / "podman" / "containers.conf"))}
    probe = subprocess.run(["podman", "run", "--rm", "--help"], check=False, capture_output=True, text=True, env=env, timeout=60)
    info = subprocess.run(["podman", "info"], check=False, capture_output=True, text=True, env=env, timeout=60)
    if probe.returncode != 0 or info.returncode != 0:
        pytest.skip(f"podman does not run here: {(info.stderr or probe.stderr).strip()[-300:]}")
    return env


def podman(engine: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], check=False, capture_output=True, text=True, env=engine, timeout=timeout)


@pytest.fixture(scope="module")
def image(engine) -> str:
    """The image under test: $QFM_CONTAINER_IMAGE, else the one scripts/build_image.sh builds (or finds
    up to date: unchanged layers come from the engine's cache)."""
    name = os.environ.get("QFM_CONTAINER_IMAGE")
    if not name:
        built = subprocess.run([str(REPO / "scripts" / "build_image.sh")], check=False, capture_output=True, text=True,
                               env=engine, timeout=4 * 3600, cwd=REPO)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        name = re.search(r"^built (\S+) ", built.stdout, re.MULTILINE).group(1)
    found = podman(engine, "image", "inspect", "--format", "{{index .RepoTags 0}}", name)
    assert found.returncode == 0, f"no image {name}: {found.stderr}"
    return found.stdout.strip()  # as the Docker API lists it (podman: localhost/NAME:TAG)


@pytest.fixture(scope="module")
def docker_host(engine, tmp_path_factory) -> str:
    """podman's Docker-compatible API on a unix socket, for the `docker` package kfp.local uses."""
    folder = tmp_path_factory.mktemp("podman-api")
    socket_path = folder / "podman.sock"
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
                            stdout=(folder / "service.log").open("w"), stderr=subprocess.STDOUT, env=engine,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not socket_path.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert socket_path.exists(), (folder / "service.log").read_text()
    yield f"unix://{socket_path}"
    stop(proc)


def _mlflow_server(folder: Path, artifacts: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A tracking server on 127.0.0.1 whose clients write artifacts straight to S3 (`artifacts`)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                  "--default-artifact-root", artifacts, "--no-serve-artifacts", "--host", "127.0.0.1", "--port",
                  str(port), "--workers", "1"], folder / "server.log",
                 env=env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc, folder / "server.log")
    return proc, url


@pytest.fixture(scope="module")
def runs(image, docker_host, engine, moto_s3, tiny_demo, tmp_path_factory) -> dict:
    """The tiny demo DAG twice, each against its own MLflow server (artifacts in the moto S3 bucket):
    as subprocesses of this environment, then with every step in the image. Returns per runner: its run
    folder, MLflow URL, seconds, and the containers the engine started for it."""
    import boto3

    from pipelines.local_run import run_local
    from qfm.config import load_params

    root = tmp_path_factory.mktemp("container-runs")
    s3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_ENDPOINT_URL": moto_s3.url, "MLFLOW_S3_ENDPOINT_URL": moto_s3.url, "AWS_EC2_METADATA_DISABLED": "true"}
    boto3.client("s3", endpoint_url=moto_s3.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="qfm-mlflow")
    params = load_params(None, overrides=TINY)
    results = {}
    for runner in ("subprocess", "docker"):
        proc, url = _mlflow_server(root / f"mlflow-{runner}", f"s3://qfm-mlflow/{runner}", s3)
        try:
            with pytest.MonkeyPatch.context() as env:
                for name, value in s3.items():
                    env.setenv(name, value)
                env.setenv("MLFLOW_TRACKING_URI", url)
                env.setenv("OMP_NUM_THREADS", "1")
                env.setenv("DOCKER_HOST", docker_host)
                env.delenv("QFM_GIT_COMMIT", raising=False)
                env.chdir(root)
                since = int(time.time())
                started = time.perf_counter()
                run_dir = run_local(params, tiny_demo.parent / "demo", root / f"kfp-{runner}",
                                    docker_image=image if runner == "docker" else None)
                seconds = time.perf_counter() - started
        finally:
            stop(proc)
        results[runner] = {"run_dir": run_dir, "seconds": seconds, "mlflow": root / f"mlflow-{runner}",
                           "containers": _started_containers(engine, since, int(time.time()) + 1)}
        print(f"{runner} runner: the tiny demo DAG in {seconds:.0f} s")
    return results


def _started_containers(engine: dict[str, str], since: int, until: int) -> list[str]:
    """The images of the containers the engine started from `since` to `until` (Unix seconds); podman 4.3's
    `events --until` returns nothing with the file event logger, so the end is applied here."""
    from datetime import UTC, datetime

    lines = podman(engine, "events", "--stream=false", "--since", str(since), "--filter", "event=start",
                   "--format", "{{.Time}}|{{.Image}}", timeout=120).stdout.splitlines()
    started = []
    for line in lines:
        when, _, image = line.partition("|")
        if datetime.strptime(when[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp() <= until:
            started.append(image)
    return started


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "evaluate" / "results" / "metrics.json").read_text())["metrics"]


def test_the_image_names_its_commit(image, engine):
    revision = podman(engine, "image", "inspect", "--format",
                      '{{index .Labels "org.opencontainers.image.revision"}}', image).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", revision), revision
    assert image.endswith(f"-{revision[:12]}" + ("-dirty" if revision.endswith("-dirty") else ""))
    shown = podman(engine, "run", "--rm", image, "--version", timeout=300)
    assert shown.returncode == 0 and shown.stdout.strip() == f"qfm 0.1.0 (commit {revision})", shown


def test_every_step_runs_in_the_image_with_the_subprocess_runs_metrics(runs, image, moto_s3):
    import boto3

    subprocess_run, docker_run = runs["subprocess"], runs["docker"]
    assert docker_run["containers"].count(image) == len(STEPS), docker_run["containers"]
    assert subprocess_run["containers"] == []
    for run in (subprocess_run, docker_run):
        assert STEPS <= {p.name for p in run["run_dir"].iterdir() if p.is_dir()}
        promotion = json.loads((run["run_dir"] / "promote" / "promotion" / "promotion.json").read_text())
        assert promotion["promoted"] is True and promotion["version"] == 1
    by_subprocess, by_image = _metrics(subprocess_run["run_dir"]), _metrics(docker_run["run_dir"])
    assert by_image["n"] == by_subprocess["n"] > 0
    for name, value in by_subprocess.items():
        if isinstance(value, float):
            assert by_image[name] == pytest.approx(value, abs=METRIC_TOLERANCE), name
    # The containers logged to MLflow on the host, and wrote the runs' artifacts to its S3 bucket
    with sqlite3.connect(docker_run["mlflow"] / "mlflow.db") as db:
        uris = [row[0] for row in db.execute("SELECT artifact_uri FROM runs")]
    assert uris and all(uri.startswith("s3://qfm-mlflow/docker/") for uri in uris), uris
    objects = boto3.client("s3", endpoint_url=moto_s3.url, aws_access_key_id="testing",
                           aws_secret_access_key="testing", region_name="us-east-1").list_objects_v2(
        Bucket="qfm-mlflow", Prefix="docker/")
    assert objects["KeyCount"] > 0


def test_the_image_scores_the_demo_images_as_this_environment(runs, image, engine, tiny_demo, tmp_path):
    model = runs["docker"]["run_dir"] / "train-student" / "model"
    images = tiny_demo.parent / "demo"
    here = subprocess.run([str(BIN / "python"), "-m", "qfm", "score", "--model", str(model), "--device", "cpu",
                           "--quiet", "--out", str(tmp_path / "venv.csv"), str(images)], check=False,
                          capture_output=True,
                          text=True, timeout=1800, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert here.returncode == 0, here.stderr[-2000:]
    inside = podman(engine, "run", "--rm", "-e", "OMP_NUM_THREADS=1", "-v", f"{model}:{model}:ro",
                    "-v", f"{images}:{images}:ro", "-v", f"{tmp_path}:/out", image, "score", "--model", str(model),
                    "--device", "cpu", "--quiet", "--out", "/out/image.csv", str(images), timeout=1800)
    assert inside.returncode == 0, inside.stderr[-2000:]
    venv, contained = pd.read_csv(tmp_path / "venv.csv"), pd.read_csv(tmp_path / "image.csv")
    assert len(venv) == len(contained) > 0 and list(venv["path"]) == list(contained["path"])
    assert (venv["score"] - contained["score"]).abs().max() <= SCORE_TOLERANCE


def _post(url: str, payload: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_champion_served_from_the_image_answers_as_this_environments_server(runs, image, engine, moto_s3,
                                                                                 tiny_demo, tmp_path):
    """`mlflow models serve` of the docker run's champion (onnxruntime engine), in the image and from this
    environment, against the same registry: the same answers to the same HTTP requests."""
    import base64

    images = tiny_demo.parent / "demo" / "images"
    files = sorted(images.glob("*.png"))[:4]
    s3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_ENDPOINT_URL": moto_s3.url, "MLFLOW_S3_ENDPOINT_URL": moto_s3.url, "AWS_EC2_METADATA_DISABLED": "true"}
    registry, tracking = _mlflow_server(runs["docker"]["mlflow"], "s3://qfm-mlflow/docker", s3)
    serve_env = s3 | {"MLFLOW_TRACKING_URI": tracking, "QFM_ENGINE": "onnxruntime", "QFM_DEVICE": "cpu",
                      "QFM_SERVE_ROOT": str(images), "OMP_NUM_THREADS": "1"}
    serve = ["models", "serve", "-m", "models:/qfm-iqm@champion", "--env-manager", "local", "-h", "127.0.0.1",
             "-w", "1"]
    here_port, image_port = free_port(), free_port()
    here = start([str(BIN / "mlflow"), *serve, "-p", str(here_port)], tmp_path / "venv-serve.log",
                 env=serve_env | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    name = f"qfm-serve-{image_port}"
    environment = [arg for key, value in serve_env.items() for arg in ("-e", f"{key}={value}")]
    started = podman(engine, "run", "-d", "--rm", "--name", name, "--network", "host", *environment,
                     "-v", f"{images}:{images}:ro", "--entrypoint", "mlflow", image, *serve, "-p", str(image_port))
    try:
        assert started.returncode == 0, started.stderr
        answers = {}
        for which, port, proc in (("venv", here_port, here), ("image", image_port, None)):
            url = f"http://127.0.0.1:{port}"
            if proc is not None:
                wait_http(f"{url}/ping", proc, tmp_path / "venv-serve.log", timeout=600)
            else:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    try:
                        if _post(url, {"dataframe_records": []})[0] in (200, 400):
                            break
                    except OSError:
                        time.sleep(1)
                else:
                    pytest.fail(podman(engine, "logs", name).stderr[-3000:])
            by_path = _post(url, {"dataframe_split": {"columns": ["path"], "data": [[str(f)] for f in files]}})
            by_bytes = _post(url, {"dataframe_records": [{"image": base64.b64encode(f.read_bytes()).decode()}
                                                         for f in files]})
            outside = _post(url, {"dataframe_split": {"columns": ["path"], "data": [["/etc/passwd"]]}})
            answers[which] = (by_path, by_bytes, outside)
        for (status, body), (status_here, body_here) in zip(answers["image"], answers["venv"], strict=True):
            assert status == status_here, (body, body_here)
            if status == 200:
                scores = [row["score"] for row in body["predictions"]]
                assert scores == pytest.approx([row["score"] for row in body_here["predictions"]], abs=SCORE_TOLERANCE)
                assert len(scores) == len(files)
        assert 400 <= answers["image"][2][0] < 500  # a path outside QFM_SERVE_ROOT is refused in the image too
    finally:
        podman(engine, "rm", "-f", name)
        stop(here)
        stop(registry)
