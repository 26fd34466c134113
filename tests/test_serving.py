"""`mlflow models serve -m models:/NAME@champion --env-manager local` on a free port answers real HTTP
requests (image paths, base64 image bytes) with the scores `qfm score --model models:/NAME@champion` gives,
refuses each kind of bad request with a 400 that names the problem (no stack trace, no server path), and
keeps answering afterwards."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def serving(champion_store: str, tiny_demo: Path, log: Path, env: dict | None = None):
    """The champion behind `mlflow models serve` (own process group, stopped by its id): (url, process). It
    may read paths under the demo's images folder only (QFM_SERVE_ROOT)."""
    port = registry.free_port()
    proc = registry.start([str(registry.BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], log,
                          env={"MLFLOW_TRACKING_URI": champion_store, "OMP_NUM_THREADS": "1", "QFM_DEVICE": "cpu",
                               "QFM_SERVE_ROOT": str(images_folder(tiny_demo)),
                               "PATH": f"{registry.BIN}{os.pathsep}{os.environ['PATH']}"} | (env or {}))  # it execs uvicorn
    try:
        registry.wait_http(f"http://127.0.0.1:{port}/ping", proc, log)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        registry.stop(proc)


@pytest.fixture(scope="module")
def server(champion_store, tmp_path_factory, tiny_demo):
    with serving(champion_store, tiny_demo, tmp_path_factory.mktemp("serve") / "serve.log") as running:
        yield running


@pytest.fixture(scope="module")
def served(server) -> str:
    return server[0]


def images_folder(tiny_demo: Path) -> Path:
    return tiny_demo.parent / "demo" / "images"


def post(url: str, payload: dict | bytes) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
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
                                     + [{"image": base64.b64encode(b"not an image").decode()}],
                                     "params": {"on_error": "report"}})
    assert status == 200, by_bytes
    rows = by_bytes["predictions"]
    assert [r["score"] for r in rows[:2]] == pytest.approx(expected[:2], abs=1e-6)
    assert rows[0]["error"] is None and rows[2]["error"] == "row 2: not an image file (no decoder recognises its bytes)"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with a few bytes of pixel data: decoding it
    would need width * height * 3 bytes, reading its header needs none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


def truncated_jpeg(image: Path) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(image).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def records(*blobs: bytes) -> dict:
    return {"dataframe_records": [{"image": base64.b64encode(blob).decode()} for blob in blobs]}


def group_rss_mb(proc) -> float:
    """Resident memory of every process in the server's process group (the CLI, uvicorn and its worker)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if os.getpgid(int(status.parent.name)) == proc.pid:
                total += next(int(line.split()[1]) for line in status.read_text().splitlines()
                              if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


BAD_REQUESTS = {  # name -> (request body, what the 400's message must say)
    "not an image": (lambda images: records(b"GIF89a but not really"), "row 0: not an image file"),
    "empty body": (lambda images: b"", "Invalid input"),
    "truncated JPEG": (lambda images: records(truncated_jpeg(images[0])),
                       "row 0: cannot decode image row 0's image (image file is truncated"),
    "wrong column": (lambda images: {"dataframe_split": {"columns": ["photo"], "data": [["a.png"]]}},
                     "the input has columns ['photo']; the model takes 'image'"),
    "no rows": (lambda images: {"dataframe_split": {"columns": ["image"], "data": []}}, "the input has no rows"),
    "decompression bomb": (lambda images: records(png_header(40000, 40000)),
                           "row 0: the image is too large to decode (1600000000 pixels"),
    "path outside the folder": (lambda images: {"dataframe_records": [{"path": str(images[0].parent.parent /
                                                                                 "manifest.csv")}]},
                                "is outside the folder this server may read"),
    "path escaping the folder": (lambda images: {"dataframe_records": [{"path": "../" + images[0].name}]},
                                 "is outside the folder this server may read"),
    "one bad row among good ones": (lambda images: records(images[0].read_bytes(), b"junk"),
                                    "1 of 2 rows cannot be scored: row 1: not an image file"),
    "unknown on_error": (lambda images: records(images[0].read_bytes()) | {"params": {"on_error": "skip"}},
                         "params.on_error must be one of ['reject', 'report']"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_400_naming_the_problem_and_the_server_keeps_answering(server, tiny_demo, case):
    url, proc = server
    images = sorted(images_folder(tiny_demo).glob("*.png"))[:1]
    build, expected = BAD_REQUESTS[case]
    before = group_rss_mb(proc)
    status, body = post(url, build(images))
    assert status == 400, body
    text = json.dumps(body)
    assert expected in body["message"], body["message"]
    assert "stack_trace" not in body and "Traceback" not in text and "qfm-score-" not in text
    assert str(Path(__file__).parent.parent) not in text  # no path of the server's own files
    assert group_rss_mb(proc) - before < 300  # a decoded 40000 x 40000 image would need 4.8 GB
    status, good = post(url, records(images[0].read_bytes()))  # and it keeps answering
    assert status == 200 and good["predictions"][0]["error"] is None


NO_TORCH = """import os, sys
sys.modules["torch"] = None  # any `import torch` in this process now raises ImportError
with open(os.environ["QFM_TEST_NO_TORCH_LOG"], "a") as log:
    log.write(f"{os.getpid()}\\n")
"""


def test_served_onnx_engine_needs_no_torch(champion_store, tiny_demo, tmp_path_factory, tmp_path):
    """QFM_ENGINE=onnxruntime behind `mlflow models serve`, every Python process of it unable to import torch
    (a sitecustomize on PYTHONPATH): it starts, and scores like the torch engine within 1e-4."""
    from qfm.steps.score import score_images

    images = sorted(images_folder(tiny_demo).glob("*.png"))[:4]
    champion = registry.students(tiny_demo, tmp_path_factory.getbasetemp())["good"]  # built by champion_store
    expected = score_images(champion, images, device="cpu", workers=0, progress=False)["score"].to_numpy()
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    started, log = tmp_path / "processes.txt", tmp_path / "serve.log"
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {"QFM_ENGINE": "onnxruntime", "PYTHONPATH": path, "QFM_TEST_NO_TORCH_LOG": str(started)}
    with serving(champion_store, tiny_demo, log, env) as (url, _):
        status, body = post(url, {"dataframe_records": [{"path": p.name} for p in images[:2]]
                                  + [{"image": base64.b64encode(p.read_bytes()).decode()} for p in images[2:]]
                                  + [{"image": base64.b64encode(b"junk").decode()}], "params": {"on_error": "report"}})
    assert status == 200, body
    scorer = re.search(r"Started server process \[(\d+)\]", log.read_text())
    assert scorer and scorer[1] in started.read_text().split()  # the process that scored blocked torch
    rows = body["predictions"]
    assert [r["error"] for r in rows] == [None] * 4 + ["row 4: not an image file (no decoder recognises its bytes)"]
    diff = abs(expected - [r["score"] for r in rows[:4]]).max()
    print(f"max |torch engine - served onnxruntime without torch| over {len(images)} images: {diff:.2e}")
    assert diff <= 1e-4
