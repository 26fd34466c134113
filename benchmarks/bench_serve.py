"""The served champion under concurrent load: `mlflow models serve -m models:/NAME@champion` on 127.0.0.1,
driven by N client threads for a fixed number of requests, at batch 1 and batch 16 (images per request),
with the torch engine and with onnxruntime (QFM_ENGINE). Reports images/s and the p50/p95/p99 request
latency. The model is registered the way `qfm promote` does it (qfm.registry.pyfunc.log_scorer, an alias
`champion`) in a throw-away SQLite store; the server is stopped by its own process group.

    python benchmarks/bench_serve.py --checkpoint T/best.safetensors --clients 4 --json serve.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLIVE = REPO.parent / "shared/datasets/clive-dev/ChallengeDB_release/Images"
MODEL = "qfm-bench"
BIN = Path(sys.executable).parent


def register(checkpoint: Path, example: Path, store: str) -> None:
    """Log and register the checkpoint as qfm promote does, with the alias champion."""
    import mlflow

    from qfm.registry.pyfunc import log_scorer

    mlflow.set_tracking_uri(store)
    with mlflow.start_run():
        info = log_scorer(checkpoint, example)
    version = mlflow.register_model(info.model_uri, MODEL)
    mlflow.MlflowClient(store).set_registered_model_alias(MODEL, "champion", version.version)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(store: str, engine: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": store, "QFM_ENGINE": engine, "QFM_DEVICE": "cpu",
                        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"the server did not answer within 180 s:\n{log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def request(url: str, blobs: list[str]) -> float:
    """One request's latency in seconds; fails on anything but a 200 with one score per image."""
    body = json.dumps({"dataframe_records": [{"image": b} for b in blobs]}).encode()
    start = time.perf_counter()
    req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as response:
        rows = json.loads(response.read())["predictions"]
    if len(rows) != len(blobs) or any(r["error"] for r in rows):
        raise SystemExit(f"bad answer: {rows[:2]}")
    return time.perf_counter() - start


def load(url: str, blobs: list[str], batch: int, requests: int, clients: int) -> dict:
    """requests requests of batch images from clients threads; images/s and latency percentiles."""
    payloads = [[blobs[(i * batch + k) % len(blobs)] for k in range(batch)] for i in range(requests)]
    request(url, payloads[0])  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.array(list(pool.map(lambda p: request(url, p), payloads)))
    wall = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"batch": batch, "requests": requests, "clients": clients, "wall_s": wall,
            "images_per_s": requests * batch / wall, "p50_s": p50, "p95_s": p95, "p99_s": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained best.safetensors (e.g. a clive-dev teacher)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--images", type=int, default=128, help="images sent per (engine, batch) setting")
    parser.add_argument("--json")
    args = parser.parse_args()
    paths = sorted(CLIVE.glob("*.JPG"))[:32]
    if not paths:
        raise SystemExit(f"needs the clive-dev JPEG images in {CLIVE}")
    blobs = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    store = f"sqlite:///{work}/mlflow.db"
    register(Path(args.checkpoint), paths[0], store)
    rows = []
    for engine in ("torch", "onnxruntime"):
        proc, url = serve(store, engine, work / f"serve-{engine}.log")
        try:
            for batch in (1, 16):
                row = {"engine": engine} | load(url, blobs, batch, max(args.images // batch, args.clients),
                                                args.clients)
                rows.append(row)
                print(f"{engine:12} batch {batch:2}: {row['images_per_s']:6.2f} images/s, latency p50 "
                      f"{row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, p99 {row['p99_s']:.2f} s "
                      f"({row['requests']} requests, {args.clients} clients)", flush=True)
        finally:
            stop(proc)
    if args.json:
        Path(args.json).write_text(json.dumps({"clients": args.clients, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
