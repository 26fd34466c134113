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
    assert rows[0]["error"] is None
    assert rows[2]["error"] == "row 2: not an image file of an accepted format (JPEG, PNG, BMP, TIFF or WebP)"


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


def gif(image: Path) -> bytes:
    """The image as a GIF: a real image, which PIL opens, in a format the model does not take."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(image).convert("P").save(buffer, "GIF")
    return buffer.getvalue()


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
                                "manifest.csv' is not an image this server can read; send the path of a JPEG"),
    "path escaping the folder": (lambda images: {"dataframe_records": [{"path": "../" + images[0].name}]},
                                 "is not an image this server can read; send the path of a JPEG"),
    "missing path inside the folder": (lambda images: {"dataframe_records": [{"path": "no-such.png"}]},
                                       "row 0: path 'no-such.png' is not an image this server can read"),
    "a GIF": (lambda images: records(gif(images[0])), ("row 0: not an image file of an accepted format (JPEG, PNG, "
                                                      "BMP, TIFF or WebP)")),
    "over the row cap": (lambda images: records(*[images[0].read_bytes()] * 33),
                         "the request has 33 rows; this server takes at most 32 per request (QFM_SERVE_MAX_ROWS)"),
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
    assert [r["error"] for r in rows] == [None] * 4 + [("row 4: not an image file of an accepted format (JPEG, PNG, "
                                                       "BMP, TIFF or WebP)")]
    diff = abs(expected - [r["score"] for r in rows[:4]]).max()
    print(f"max |torch engine - served onnxruntime without torch| over {len(images)} images: {diff:.2e}")
    assert diff <= 1e-4


# Request handling, without a server: the caps, QFM_SERVE_ROOT and the formats ------------------------------

def _image(path: Path, fmt: str, size: tuple[int, int] = (40, 30)) -> Path:
    """Random RGB pixels (so that the file has some size) saved in this PIL format."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    (image.convert("P") if fmt == "GIF" else image).save(path, fmt)
    return path


@pytest.fixture
def fake_scoring(monkeypatch) -> list:
    """score_frame's scorer replaced by one that decodes each file as qfm.inference does and scores it by its
    width; the list receives every batch of files sent to it (so a test sees when nothing was decoded)."""
    import qfm.inference
    from qfm.data.images import load_rgb

    calls: list = []

    def fake(model, state, files, **kwargs):
        calls.append(list(files))
        rows = []
        for i, file in enumerate(files):
            try:
                rows.append({"path": str(file), "score": load_rgb(file).size[0] / 100, "crop_std": 0.0, "error": None})
            except (OSError, ValueError) as exc:
                rows.append({"path": str(file), "score": float("nan"), "crop_std": float("nan"),
                             "error": f"image list entry {i}: cannot decode image {file} ({exc}); replace or remove it"})
        return pd.DataFrame(rows)

    monkeypatch.setattr(qfm.inference, "score_files", fake)
    for variable in ("QFM_SERVE_ROOT", "QFM_SERVE_MAX_ROWS", "QFM_SERVE_MAX_BYTES", "QFM_SERVE_MAX_PIXELS",
                     "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"):
        monkeypatch.delenv(variable, raising=False)
    return calls


def _score(frame: pd.DataFrame, on_error: str = "reject") -> pd.DataFrame:
    from qfm.registry.pyfunc import score_frame

    return score_frame(None, {}, frame, on_error=on_error)


def _refusal(frame: pd.DataFrame, on_error: str = "reject") -> str:
    """The message of the HTTP 400 the request gets (an MlflowException that the scoring server answers 400)."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as refused:
        _score(frame, on_error)
    assert refused.value.get_http_status_code() == 400 and refused.value.error_code == "INVALID_PARAMETER_VALUE"
    return refused.value.message


def test_path_rows_are_read_only_under_qfm_serve_root_whoever_hosts_the_model(fake_scoring, tmp_path, monkeypatch):
    """Not only under `mlflow models serve`: a plain Python session (no MLflow serving variable) reads no path
    without QFM_SERVE_ROOT, and no path outside it, symlinks and `..` resolved."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    _image(root / "a.png", "PNG"), _image(outside / "secret.png", "PNG")
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "link-in.png").symlink_to(root / "a.png")
    message = _refusal(pd.DataFrame({"path": [str(root / "a.png")]}))
    assert "row 0: this model reads no image files: QFM_SERVE_ROOT is not set" in message
    assert fake_scoring == []

    monkeypatch.setenv("QFM_SERVE_ROOT", str(root))
    good = _score(pd.DataFrame({"path": ["a.png", str(root / "a.png"), "link-in.png", "sub/../a.png"]}))
    assert good["error"].isna().all() and good["score"].tolist() == [0.4] * 4
    for escaping in ("escape.png", "../outside/secret.png", str(outside / "secret.png"), "/etc/passwd", "a.png\0x"):
        out = _score(pd.DataFrame({"path": [escaping]}), on_error="report")
        assert out["error"][0].startswith(f"row 0: path '{escaping}' is not an image this server can read"), escaping
        assert all(str(outside) not in str(call) for call in fake_scoring)  # never read


def test_a_missing_path_and_a_file_that_is_not_an_image_get_the_same_answer(fake_scoring, tmp_path, monkeypatch):
    """So that a client cannot tell which files exist: missing, a folder, text, a GIF, a damaged PNG alike."""
    monkeypatch.setenv("QFM_SERVE_ROOT", str(tmp_path))
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "subdir").mkdir()
    _image(tmp_path / "anim.gif", "GIF")
    whole = _image(tmp_path / "whole.png", "PNG", (300, 200)).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    names = ["missing.png", "subdir", "notes.png", "anim.gif", "cut.png"]
    out = _score(pd.DataFrame({"path": names}), on_error="report")
    answers = {out["error"][i].replace(name, "NAME").replace(f"row {i}", "row N") for i, name in enumerate(names)}
    assert len(answers) == 1, answers
    assert answers.pop().startswith("row N: path 'NAME' is not an image this server can read; send the path of a JPEG")


@pytest.mark.parametrize("variable, value, rows, expected", [
    ("QFM_SERVE_MAX_ROWS", "2", 3, ("the request has 3 rows; this server takes at most 2 per request "
                                   "(QFM_SERVE_MAX_ROWS)")),
    ("QFM_SERVE_MAX_BYTES", "1000", 2, ("bytes of image files; this server takes at most 1000 per request "
                                       "(QFM_SERVE_MAX_BYTES)")),
    ("QFM_SERVE_MAX_PIXELS", "2000", 2, ("the request has 2400 pixels (width x height, summed over the images); this "
                                        "server takes at most 2000 per request (QFM_SERVE_MAX_PIXELS)")),
])
def test_a_request_over_a_cap_is_refused_whole_before_anything_is_decoded(fake_scoring, tmp_path, monkeypatch,
                                                                          variable, value, rows, expected):
    """Two 40 x 30 PNGs of 1200 pixels each: over 2000 pixels in all, over 1000 bytes as base64 or as paths.
    The cap holds with on_error=report too (the request, not a row, is too big), and nothing reaches the scorer."""
    blob = base64.b64encode(_image(tmp_path / "a.png", "PNG").read_bytes()).decode()
    monkeypatch.setenv("QFM_SERVE_ROOT", str(tmp_path))
    assert _score(pd.DataFrame({"image": [blob] * rows}))["error"].isna().all()  # under the defaults: scored
    monkeypatch.setenv(variable, value)
    for frame in (pd.DataFrame({"image": [blob] * rows}), pd.DataFrame({"path": ["a.png"] * rows})):
        for on_error in ("reject", "report"):
            assert expected in _refusal(frame, on_error)
    assert len(fake_scoring) == 1  # the first request, under the defaults


def test_the_caps_have_defaults_and_a_bad_setting_names_its_variable(monkeypatch):
    from qfm.errors import ConfigError
    from qfm.registry.pyfunc import read_limits

    for variable in ("QFM_SERVE_MAX_ROWS", "QFM_SERVE_MAX_BYTES", "QFM_SERVE_MAX_PIXELS"):
        monkeypatch.delenv(variable, raising=False)
    assert read_limits() == {"rows": 32, "bytes": 64 * 2**20, "pixels": 100_000_000}
    monkeypatch.setenv("QFM_SERVE_MAX_BYTES", "64MB")
    with pytest.raises(ConfigError, match="QFM_SERVE_MAX_BYTES='64MB' is not a whole number"):
        read_limits()
    monkeypatch.setenv("QFM_SERVE_MAX_BYTES", "0")
    with pytest.raises(ConfigError, match="QFM_SERVE_MAX_BYTES must be at least 1, got 0"):
        read_limits()


ACCEPTED = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
REFUSED = ("GIF", "PPM", "TGA", "EPS", "ICO")


@pytest.mark.parametrize("fmt", ACCEPTED + REFUSED)
def test_only_the_model_formats_are_decoded_in_serving_and_scoring_alike(fake_scoring, tmp_path, fmt):
    """JPEG, PNG, BMP, TIFF, WebP decode; another format (which PIL itself would open) is refused, by the
    server and by `qfm score`'s decoder, with a message naming the file and the accepted formats."""
    from PIL import Image

    from qfm.data.crops import CropConfig, decode
    from qfm.data.images import check_image, load_rgb

    file = _image(tmp_path / f"x.{fmt.lower()}", fmt)
    with Image.open(file) as img:
        assert img.format == fmt  # PIL opens every one of them
    served = _score(pd.DataFrame({"image": [file.read_bytes()]}), on_error="report")
    if fmt in ACCEPTED:
        assert load_rgb(file).size == (40, 30) and check_image(file) == (40, 30)
        assert served["error"][0] is None and served["score"][0] == 0.4
        return
    assert served["error"][0] == "row 0: not an image file of an accepted format (JPEG, PNG, BMP, TIFF or WebP)"
    assert fake_scoring == []
    with pytest.raises(OSError, match=rf"{file} is not an image of an accepted format \(JPEG, PNG, BMP, TIFF or WebP\)"):
        load_rgb(file)
    with pytest.raises(Exception, match=rf"entry 0: cannot decode image {file} \(.*accepted format \(JPEG, PNG"):
        decode(file, CropConfig(crop_size=16, test_grid="1x1"), "entry 0")
    assert check_image(file) == "not an image file of an accepted format (JPEG, PNG, BMP, TIFF or WebP)"


def test_the_decompression_bomb_guard_refuses_from_the_header(tmp_path, monkeypatch):
    """Over PIL's MAX_IMAGE_PIXELS (which PIL alone only warns about, up to twice it) is an error, before decoding."""
    from PIL import Image

    from qfm.data.images import load_rgb, open_image

    file = _image(tmp_path / "big.png", "PNG", (200, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)  # 20000 pixels: over it, under twice it
    with pytest.raises(Image.DecompressionBombError, match="200 x 100 = 20000 pixels is over the 15000-pixel"):
        open_image(file)
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(file)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    assert load_rgb(file).size == (200, 100)
