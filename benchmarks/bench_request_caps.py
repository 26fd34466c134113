"""How long the largest request that the serving caps let through holds the scoring server: one request of
QFM_SERVE_MAX_ROWS JPEG photos whose pixels add up to QFM_SERVE_MAX_PIXELS (the defaults unless those
variables are set), scored by the packaged model with the function the served model runs under its lock
(qfm.registry.pyfunc.score_frame), on each engine. The photos are the packaged demo photographs, resized.

    python benchmarks/bench_request_caps.py --json caps.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import platform
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image

from qfm.data.demo import PHOTOGRAPHS, load_reference
from qfm.inference import load_engine_model
from qfm.packaged import packaged_model
from qfm.registry.pyfunc import read_limits, score_frame


def largest_request(limits: dict[str, int], quality: int = 92) -> tuple[pd.DataFrame, dict]:
    """A frame of limits['rows'] base64 JPEGs of equal size, 3:2, whose pixels sum to at most limits['pixels']."""
    rows = limits["rows"]
    per_image = limits["pixels"] // rows
    height = int(math.sqrt(per_image / 1.5))
    width = int(per_image // height)
    blobs, total_bytes = [], 0
    for i in range(rows):
        photo = Image.fromarray(load_reference(PHOTOGRAPHS[i % len(PHOTOGRAPHS)], size=1024)).resize(
            (width, height), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=quality)
        total_bytes += buffer.tell()
        blobs.append(base64.b64encode(buffer.getvalue()).decode())
    if total_bytes > limits["bytes"]:
        raise SystemExit(f"the request's {total_bytes} bytes exceed the bytes cap {limits['bytes']}: lower --quality")
    return pd.DataFrame({"image": blobs}), {"rows": rows, "width": width, "height": height,
                                            "pixels": rows * width * height, "bytes": total_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="torch,onnxruntime")
    parser.add_argument("--repeats", type=int, default=2, help="timed requests per engine (after one warm-up)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    limits = read_limits()
    frame, request = largest_request(limits)
    print(f"request: {request['rows']} JPEGs of {request['width']}x{request['height']}, "
          f"{request['pixels'] / 1e6:.1f} Mpx, {request['bytes'] / 2**20:.1f} MiB (caps: {limits})")
    results = {"request": request, "limits": limits, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "engines": {}}
    for engine in args.engines.split(","):
        model, state, device = load_engine_model(packaged_model(engine), engine, "cpu")
        score_frame(model, state, frame.head(2), device=device)  # warm-up
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            scored = score_frame(model, state, frame, device=device)
            seconds.append(time.perf_counter() - started)
            assert len(scored) == len(frame) and scored["error"].isna().all()
        results["engines"][engine] = {"seconds": [round(s, 2) for s in seconds], "median": float(np.median(seconds))}
        print(f"{engine}: {np.median(seconds):.1f} s for the largest request (runs: {seconds})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
