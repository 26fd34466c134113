"""Loader throughput: decode once per image and cut K crops (qfm) vs one decode per crop (DEIQT's way).

Both loaders read the same images with the same workers, batch the same number of crops and use the
same crop code; the only difference is that the baseline lists every image K times and decodes it for
each of its crops, as DEIQT's dataset does. Passes alternate between the two loaders; the reported rate
of each is the median over its passes (the first pass includes starting the persistent workers).

    python benchmarks/bench_loader.py --crops 4 --workers 2 --max-images 100 --json loader.json

--images takes a folder of images, a manifest (manifest.parquet or its folder), 'demo' (the project's
demo dataset, made in a temporary folder) or 'synthetic' (generated photo-like JPEGs of --synthetic-size,
e.g. 1024x768 as a stand-in for KonIQ-10k). Without it, the shared clive-dev images are used when present
next to the repository, else the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qfm.data.demo import IMAGES_DIR, make_demo
from qfm.data.images import list_images
from qfm.data.manifest import MANIFEST_FILE, read_manifest
from qfm.data.torch_dataset import CropConfig, ImageListDataset, make_loader
from qfm.errors import QfmError

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIVE_IMAGES = REPO_ROOT.parent / "shared/datasets/clive-dev/ChallengeDB_release/Images"


def synthetic_jpegs(folder: Path, size: tuple[int, int], n: int = 60) -> list[Path]:
    """Photo-like JPEGs (smooth content plus noise) of a given size, e.g. KonIQ-10k's 1024x768."""
    rng = np.random.default_rng(0)
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(1, 8, 3)
        base = np.stack([np.sin(a * x + i), np.cos(b * y), np.sin(c * (x + y))], axis=-1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"synthetic_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def find_images(spec: str | None, workdir: Path, synthetic_size: tuple[int, int]) -> tuple[list[Path], str]:
    """The image paths to load and a description of where they came from."""
    if spec is None and CLIVE_IMAGES.is_dir():
        return list_images(CLIVE_IMAGES), "clive-dev (../shared/datasets/clive-dev)"
    if spec is None or spec == "demo":
        make_demo(workdir, n_references=5, image_size=500, progress=False)
        return list_images(workdir / IMAGES_DIR), "the demo dataset (5 references, 500x500 PNG)"
    if spec == "synthetic":
        width, height = synthetic_size
        return synthetic_jpegs(workdir, synthetic_size), f"synthetic photo-like JPEGs ({width}x{height})"
    path = Path(spec)
    if path.suffix == ".parquet" or (path / MANIFEST_FILE).is_file():
        manifest = read_manifest(path)
        return [manifest.image_path(p) for p in manifest.frame["path"]], f"manifest {path}"
    if path.is_dir():
        return list_images(path), f"folder {path}"
    raise QfmError(f"--images {spec}: not a folder of images, a manifest.parquet or a folder holding one")


def one_pass(loader, dataset, epoch: int) -> tuple[int, float]:
    """Crops delivered and seconds taken by one full pass over the loader."""
    dataset.set_epoch(epoch)
    start = time.perf_counter()
    crops = 0
    for batch in loader:
        crops += batch["image"].shape[0]
    return crops, time.perf_counter() - start


def cpu_per_crop(loader, dataset) -> float:
    """CPU milliseconds per crop of one in-process pass (workers=0): barely moved by other load."""
    dataset.set_epoch(0)
    start, crops = time.process_time(), 0
    for batch in loader:
        crops += batch["image"].shape[0]
    return (time.process_time() - start) * 1e3 / crops


def run(paths: list[Path], crops: int, workers: int, batch_images: int, crop_size: int,
        resize: str | None, repeats: int) -> dict:
    """Both loaders over the same images, passes interleaved; rates in crops per second."""
    ours_config = CropConfig(crop_size=crop_size, n_crops=crops, resize=resize)
    base_config = CropConfig(crop_size=crop_size, n_crops=1, resize=resize)
    ours_set = ImageListDataset(paths, ours_config, train=True)
    repeated = [p for p in paths for _ in range(crops)]  # DEIQT: each image listed K times, one crop each
    base_set = ImageListDataset(repeated, base_config, train=True)
    loaders = {
        "decode_once": (make_loader(ours_set, batch_images, workers), ours_set),
        "decode_per_crop": (make_loader(base_set, batch_images * crops, workers), base_set),
    }
    passes: dict[str, list[dict]] = {name: [] for name in loaders}
    for r in range(repeats):
        order = list(loaders) if r % 2 == 0 else list(reversed(loaders))
        for name in order:
            loader, dataset = loaders[name]
            n, seconds = one_pass(loader, dataset, epoch=r)
            rate = n / seconds
            passes[name].append({"crops": n, "seconds": round(seconds, 3), "crops_per_s": round(rate, 1)})
            print(f"pass {r}: {name:<16} {n} crops in {seconds:6.2f} s = {rate:7.1f} crops/s", flush=True)
    rates = {name: statistics.median(p["crops_per_s"] for p in runs) for name, runs in passes.items()}
    cpu_ms = {name: round(cpu_per_crop(make_loader(dataset, loader.batch_size, 0), dataset), 3)
              for name, (loader, dataset) in loaders.items()}
    print(f"in-process CPU ms per crop: {cpu_ms}", flush=True)
    return {"rates_crops_per_s": rates, "ratio": round(rates["decode_once"] / rates["decode_per_crop"], 2),
            "cpu_ms_per_crop_in_process": cpu_ms,
            "cpu_ratio": round(cpu_ms["decode_per_crop"] / cpu_ms["decode_once"], 2), "passes": passes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="folder, manifest, 'demo' or 'synthetic' (default: clive-dev)")
    parser.add_argument("--synthetic-size", default="1024x768", help="WxH of --images synthetic (1024x768)")
    parser.add_argument("--crops", type=int, default=4, help="K crops per image (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--max-images", type=int, default=100, help="images used, first sorted (100)")
    parser.add_argument("--batch-images", type=int, default=8, help="images per batch (decode-once)")
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--resize", default=None, help="resize policy, e.g. 512x384 or short_side=384")
    parser.add_argument("--repeats", type=int, default=3, help="passes per loader (median reported)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="qfm-bench-") as tmp:
            synthetic_size = CropConfig(resize=args.synthetic_size).resize  # parses WxH
            paths, source = find_images(args.images, Path(tmp), synthetic_size)
            if not paths:
                raise QfmError(f"no images found in {source}")
            paths = paths[: args.max_images]
            print(f"{len(paths)} images from {source}; K={args.crops}, workers={args.workers}, "
                  f"crop {args.crop_size}, resize {args.resize}", flush=True)
            result = run(paths, args.crops, args.workers, args.batch_images, args.crop_size, args.resize,
                         args.repeats)
    except QfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"images": len(paths), "source": source, "suffixes": sorted({p.suffix.lower() for p in paths}),
              "crops_per_image": args.crops, "workers": args.workers, "crop_size": args.crop_size,
              "resize": args.resize, "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "python": platform.python_version()} | result
    rates = result["rates_crops_per_s"]
    print(f"\ndecode once, {args.crops} crops: {rates['decode_once']:8.1f} crops/s (median)")
    print(f"decode per crop (DEIQT):  {rates['decode_per_crop']:8.1f} crops/s (median)")
    print(f"ratio: {result['ratio']:.2f}x (target >= 3x); "
          f"in-process CPU time ratio {result['cpu_ratio']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
