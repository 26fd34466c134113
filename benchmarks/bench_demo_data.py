"""Time of the demo dataset (`qfm demo-data`, `qfm.data.demo.make_demo`) with the demo settings of a params
file: wall seconds, seconds per content, CPU user and system seconds (this process and its worker
processes); with --check, whether every file it wrote has the same bytes (SHA-256) as in a reference folder
made before, e.g. by `qfm demo-data`; with --pixels as well, PNGs need only decode to the same pixels (for
a change of PNG encoder settings), the other files still the same bytes.

    python benchmarks/bench_demo_data.py
    python benchmarks/bench_demo_data.py --check /tmp/demo_ref      # exit status 1 if a file differs
    python benchmarks/bench_demo_data.py --check /tmp/demo_ref --pixels
    python benchmarks/bench_demo_data.py --scenes 8 --workers 1     # a quick run, in one process

Wall time depends on what else runs on the machine; CPU seconds less so.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from qfm.config import load_params
from qfm.data.demo import make_demo

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> tuple[float, float]:
    """User and system CPU seconds of this process and of its finished worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime


def hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under folder, by path relative to it."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pixel_hashes(folder: Path) -> dict[str, str]:
    """hashes(), with a PNG's hash taken over its mode, size and decoded pixels instead of its bytes."""
    digests = hashes(folder)
    for name in digests:
        if name.endswith(".png"):
            with Image.open(folder / name) as image:
                pixels = np.asarray(image)
                header = f"{image.mode} {image.size} {pixels.dtype}".encode()
            digests[name] = hashlib.sha256(header + pixels.tobytes()).hexdigest()
    return digests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params file (its demo section)")
    parser.add_argument("--scenes", type=int, help="override n_scenes (a quick run; --check needs the same)")
    parser.add_argument("--check", metavar="DIR", help="reference folder to compare the output with")
    parser.add_argument("--pixels", action="store_true",
                        help="with --check: compare PNGs by their decoded pixels, other files by bytes")
    parser.add_argument("--workers", type=int, help="worker processes (default: every usable core)")
    args = parser.parse_args()
    settings = dataclasses.asdict(load_params(args.params)["demo"])
    if args.scenes is not None:
        settings["n_scenes"] = args.scenes
    n_contents = settings["n_scenes"] + settings["n_references"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        before, started = cpu_seconds(), time.perf_counter()
        make_demo(out, progress=False, workers=args.workers, **settings)
        wall, after = time.perf_counter() - started, cpu_seconds()
        print(f"make_demo {settings}, workers {args.workers or 'all'}")
        user, system = after[0] - before[0], after[1] - before[1]
        print(f"wall {wall:.1f} s, {wall / n_contents:.3f} s per content ({n_contents}); "
              f"CPU user {user:.1f} s, system {system:.1f} s; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        if not args.check:
            return 0
        digest = pixel_hashes if args.pixels else hashes
        new, ref = digest(out), digest(Path(args.check))
        differ = sorted(name for name in new.keys() & ref.keys() if new[name] != ref[name])
        missing, extra = sorted(ref.keys() - new.keys()), sorted(new.keys() - ref.keys())
        for label, names in (("differ", differ), ("missing", missing), ("not in the reference", extra)):
            if names:
                print(f"{len(names)} files {label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
        same = not (differ or missing or extra)
        how = "identical (PNGs: decoded pixels; other files: bytes)" if args.pixels else "identical"
        print(f"{how if same else 'NOT ' + how}: {len(new)} files against {args.check}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
