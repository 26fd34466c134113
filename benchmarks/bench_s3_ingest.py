"""Ingest throughput from a local S3 endpoint (moto_server on 127.0.0.1): files/s and MB/s of the verified,
parallel prefix download at several worker counts, the warm re-run (every file already identical: listing and
checks only), and `qfm ingest --root s3://...` end to end (download, then decode-check and manifest).

    python benchmarks/bench_s3_ingest.py --workers 1,4,16 --json s3_ingest.json

--dataset takes a dataset folder and --format its adapter; without them the shared clive-dev release
(next to the repository) is used when present (format livec), else the demo (made in a temporary folder).
moto keeps objects in memory on the same machine, so these figures bound the client side (hashing,
temp-file writes, request overhead), not a network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIVE = REPO_ROOT.parent / "shared/datasets/clive-dev/ChallengeDB_release"
sys.path.insert(0, str(REPO_ROOT / "tests"))  # for the tests' moto_server helper

from s3_server import MotoServer

from qfm.data.demo import make_demo
from qfm.storage.s3 import download_prefix, make_client, upload_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help="dataset folder (default: shared clive-dev, else the demo)")
    parser.add_argument("--format", help="its qfm ingest format (default: livec for clive-dev, demo for the demo)")
    parser.add_argument("--workers", default="1,4,16", help="comma-separated parallel download counts")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qfm-bench-s3-") as tmp:
        tmp = Path(tmp)
        dataset, fmt = _dataset(args, tmp)
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        os.environ.update(env)
        with MotoServer(tmp / "moto.log") as moto:
            os.environ["AWS_ENDPOINT_URL"] = moto.url
            client = make_client(moto.url, max_pool_connections=32)
            client.create_bucket(Bucket="bench")
            uri = "s3://bench/datasets/" + dataset.name
            results = {"dataset": str(dataset), "format": fmt, "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
                       "upload": _rates(upload_dir(dataset, uri, client, workers=16))}
            results["download"] = {}
            for workers in map(int, args.workers.split(",")):
                shutil.rmtree(tmp / "cache", ignore_errors=True)
                results["download"][workers] = _rates(download_prefix(uri, tmp / "cache", client, workers=workers))
            warm = download_prefix(uri, tmp / "cache", client, workers=16)
            results["warm_rerun_s"] = round(warm.seconds, 3)
            shutil.rmtree(tmp / "cache")
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "qfm.cli", "ingest", "--format", fmt, "--root", uri, "--out",
                                   str(tmp / "manifest"), "--cache", str(tmp / "cache"), "--quiet"],
                                  capture_output=True, text=True, check=True, env=os.environ | env)
            results["cli_ingest_s"] = round(time.perf_counter() - started, 2)
            results["cli_output"] = done.stdout.strip().splitlines()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _dataset(args, tmp: Path) -> tuple[Path, str]:
    if args.dataset:
        return Path(args.dataset), args.format or "csv"
    if CLIVE.is_dir():
        return CLIVE, args.format or "livec"
    make_demo(tmp / "demo", seed=0, progress=False)
    return tmp / "demo", "demo"


def _rates(report) -> dict:
    return {"files": report.transferred, "MB": round(report.bytes / 1e6, 1), "seconds": round(report.seconds, 3),
            "files_per_s": round(report.transferred / report.seconds, 1),
            "MB_per_s": round(report.bytes / 1e6 / report.seconds, 1), "verified_by": dict(report.verified_by)}


if __name__ == "__main__":
    main()
