"""Scoring throughput of a model (images per second, deterministic 3x3 test grid) and its fraction of
the FLOP roofline: FLOPs per image (torch's FlopCounterMode: matmuls and convolutions) times images per
second, against a measured fp32 matmul rate on the same machine and threads.

    python benchmarks/bench_score.py --model qfm_mobilenetv2 --images 64 --json score.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from qfm.data.torch_dataset import CropConfig, ImageListDataset, make_loader
from qfm.models import create_model
from qfm.runtime import loader_workers, resolve_device
from qfm.train.engine import predict

REPO = Path(__file__).resolve().parents[1]
CLIVE = REPO.parent / "shared/datasets/clive-dev/ChallengeDB_release/Images"


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qfm_mobilenetv2")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", default="auto", help="loader workers (default: the product's 'auto')")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = resolve_device("cpu")  # as qfm score: the allocator keeps freed memory
    model = create_model(args.model).to(memory_format=torch.channels_last).eval()  # as load_trained_model
    config = CropConfig(mean=model.mean, std=model.std)
    if CLIVE.is_dir():
        paths = sorted(CLIVE.glob("*.JPG"))[: args.images]
    else:
        from tempfile import mkdtemp

        from qfm.data.demo import make_demo
        root = Path(mkdtemp())
        make_demo(root, progress=False)
        paths = sorted((root / "images").glob("*.png"))[: args.images]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, config.crop_size, config.crop_size))
    flops_per_crop = counter.get_total_flops()
    workers = loader_workers(args.workers if args.workers == "auto" else int(args.workers), device)
    loader = make_loader(ImageListDataset(paths, config), args.batch, workers)
    predict(model, loader, device, progress=False)  # warm-up
    start = time.perf_counter()
    predict(model, loader, device, progress=False)
    seconds = time.perf_counter() - start
    images_per_s = len(paths) / seconds
    rate = matmul_rate()
    achieved = images_per_s * config.n_test_crops * flops_per_crop
    result = {"model": args.model, "images": len(paths), "crops_per_image": config.n_test_crops,
              "images_per_s": images_per_s, "gflops_per_crop": flops_per_crop / 1e9,
              "achieved_gflop_s": achieved / 1e9, "matmul_gflop_s": rate / 1e9, "roofline_fraction": achieved / rate,
              "threads": torch.get_num_threads(), "workers": workers}
    print(f"{args.model}: {images_per_s:.2f} images/s ({config.n_test_crops} crops each), "
          f"{flops_per_crop / 1e9:.3f} GFLOP per crop -> {achieved / 1e9:.1f} GFLOP/s of a measured "
          f"{rate / 1e9:.1f} GFLOP/s matmul rate ({100 * achieved / rate:.1f}% of the roofline)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
