"""Resume overhead: `qfm train-teacher` run straight through vs SIGKILLed mid-epoch and resumed, with the run
folder local and on S3 (moto_server on 127.0.0.1; the S3 resume starts from an empty cache, as a new machine).

    python benchmarks/bench_resume.py --epochs 3 --json resume.json

Every run is single-threaded and reports wall and CPU seconds (CPU seconds are what to compare on a shared
machine). `lost` = (killed run + resumed run) - the straight run of the same kind, i.e. what the kill cost:
the redone part of the epoch plus a second start (imports, model, data, and for S3 the checkpoint download).
`s3_upload_cost` = the straight S3 run - the straight local run (the per-epoch checkpoint uploads). The best
weights of every variant are compared with the straight local run's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # for the tests' moto_server helper

from s3_server import MotoServer

from qfm.data.adapters import read_dataset
from qfm.data.demo import make_demo
from qfm.data.manifest import build_manifest, write_manifest
from qfm.data.splits import SplitProtocol
from qfm.faults import PAUSE_AT, PAUSE_MARKER
from qfm.storage.s3 import download_prefix, make_client
from qfm.train.checkpoint import BEST, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--references", type=int, default=6, help="demo photographs (more: longer epochs)")
    parser.add_argument("--size", type=int, default=128, help="demo image size; crops are 3/4 of it")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qfm-bench-resume-") as tmp:
        tmp = Path(tmp)
        make_demo(tmp / "demo", seed=0, n_references=args.references, n_scenes=0, n_levels=3, pool_levels=1,
                  image_size=args.size, progress=False)
        manifest = build_manifest(read_dataset("demo", tmp / "demo"), SplitProtocol(n_splits=1), progress=False)
        write_manifest(manifest, tmp / "manifest")
        n_train = int((manifest.frame["split_0"] == "train").sum())
        steps = n_train // 8
        settings = [f"train_teacher.{kv}" for kv in (f"epochs={args.epochs}", "batch_size=8", "n_crops=1",
                                                      f"crop_size={args.size * 3 // 4}", "test_grid=1x2", "workers=0")]
        base = ["train-teacher", "--manifest", str(tmp / "manifest"), "--quiet", "--set", "run.device=cpu",
                *[a for s in settings for a in ("--set", s)]]
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
        env = dict(os.environ)
        kill_at = f"step:{steps + steps // 2}"  # the middle of epoch 1
        results = {"train_images": n_train, "steps_per_epoch": steps, "epochs": args.epochs, "killed_at": kill_at}
        results["local_straight"] = _run([*base, "--out", str(tmp / "a")], env)
        killed = _run([*base, "--out", str(tmp / "b"), "--resume"], env, kill_at, tmp / "marker")
        resumed = _run([*base, "--out", str(tmp / "b"), "--resume"], env)
        results |= {"local_killed": killed, "local_resumed": resumed,
                    "local_lost": _lost(killed, resumed, results["local_straight"])}
        with MotoServer(tmp / "moto.log") as moto:
            env["AWS_ENDPOINT_URL"] = moto.url
            make_client(moto.url).create_bucket(Bucket="bench")
            results["s3_straight"] = _run([*base, "--out", "s3://bench/c", "--cache", str(tmp / "c-cache")], env)
            killed = _run([*base, "--out", "s3://bench/d", "--resume", "--cache", str(tmp / "d1")], env, kill_at,
                          tmp / "marker")
            resumed = _run([*base, "--out", "s3://bench/d", "--resume", "--cache", str(tmp / "d2")], env)
            results |= {"s3_killed": killed, "s3_resumed": resumed,
                        "s3_lost": _lost(killed, resumed, results["s3_straight"]),
                        "s3_upload_cost": {k: round(results["s3_straight"][k] - results["local_straight"][k], 1)
                                           for k in results["local_straight"]}}
            for name in ("c", "d"):
                download_prefix(f"s3://bench/{name}", tmp / name, make_client(moto.url))
        reference = load_checkpoint(tmp / "a" / BEST)["model"]
        results["same_weights"] = {name: all(torch.equal(reference[k], v) for k, v in
                                             load_checkpoint(tmp / name / BEST)["model"].items())
                                   for name in ("b", "c", "d")}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _run(args: list[str], env: dict, pause_at: str | None = None, marker: Path | None = None) -> dict:
    """Wall and CPU seconds of one single-threaded `qfm` run; with pause_at, until it is SIGKILLed there."""
    env = env | {"OMP_NUM_THREADS": "1"}  # CPU seconds then measure work, little moved by other jobs
    if pause_at:
        env |= {PAUSE_AT: pause_at, PAUSE_MARKER: str(marker)}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "qfm.cli", *args], env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=err, text=True)
        while pause_at and not marker.exists() and process.poll() is None:
            time.sleep(0.05)
        if pause_at and marker.exists():
            os.killpg(process.pid, signal.SIGKILL)
            marker.unlink()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != (-signal.SIGKILL if pause_at else 0):
            err.seek(0)
            raise RuntimeError(f"qfm {args[0]} ended with {process.returncode}: {err.read()[-2000:]}")
    return {"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def _lost(killed: dict, resumed: dict, straight: dict) -> dict:
    return {k: round(killed[k] + resumed[k] - straight[k], 1) for k in straight}


if __name__ == "__main__":
    main()
