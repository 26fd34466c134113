"""Loader throughput: decode once per image and cut K crops (qfm) vs one decode per crop (DEIQT's way).

Three loaders read the same images with the same workers, batch the same number of crops and use the
same crop code:

  a. decode_per_crop (DEIQT's way): every image listed K times, one decode and one float32 crop each,
     normalised in the worker;
  b. decode_once_float32: one decode per image, K float32 crops normalised in the worker;
  c. decode_once_uint8 (the product's loader): one decode, K uint8 crops in channels-last memory, which
     the model normalises on its own device.

Passes alternate between the loaders (the order rotates each repeat); the reported rate of each is the
median over its passes (the first pass includes starting the persistent workers). Then CPU milliseconds
per crop: of a pass with the same workers (started for it and ended after it, so their time counts:
decoding, cropping, batching into shared memory, handing over) and of an in-process pass (workers=0, no
shared memory), the median of 3 rotating passes each. The uint8 -> float normalisation that (c) leaves
to the model is timed on the CPU with torch on one thread (``qfm.models.normalise_uint8``, as
QfmIqm.prepare runs it; the dearer of its two layouts) and added to (c)'s CPU figure, so the CPU ratio
shows the work was not just moved.

    python benchmarks/bench_loader.py --crops 4 --workers 2 --max-images 100 --json loader.json

--images takes a folder of images, a manifest (manifest.parquet or its folder), 'demo' (the project's
demo dataset, made in a temporary folder) or 'synthetic' (generated photo-like JPEGs of --synthetic-size,
e.g. 1024x768 as a stand-in for KonIQ-10k). Without it, the shared clive-dev images are used when present
next to the repository, else the demo.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from qfm.data.demo import IMAGES_DIR, make_demo
from qfm.data.images import list_images
from qfm.data.manifest import MANIFEST_FILE, read_manifest
from qfm.data.torch_dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropConfig,
    ImageListDataset,
    collate_crops,
    make_loader,
)
from qfm.errors import QfmError
from qfm.models import normalise_uint8, pixel_affine

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
        make_demo(workdir, n_references=5, n_scenes=0, image_size=500, progress=False)
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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cpu_per_crop(dataset, batch_size: int, workers: int) -> float:
    """CPU milliseconds per crop of one pass, workers included (they are started for the pass and ended
    after it, so their CPU time is counted; with workers=0 everything runs in this process). With workers
    the figure includes batching into shared memory and handing batches over; in-process it does not."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_crops)
    dataset.set_epoch(0)
    start, crops = cpu_seconds(), 0
    for batch in loader:  # the exhausted iterator joins its workers, so RUSAGE_CHILDREN then has them
        crops += batch["image"].shape[0]
    return (cpu_seconds() - start) * 1e3 / crops


def normalisation_cost(batch: torch.Tensor, repeats: int = 20) -> dict[str, float]:
    """CPU ms per crop of the model's uint8 -> float normalisation on one torch thread (median of repeats),
    into the layout of a CPU model (contiguous) and of a GPU one (channels_last)."""
    scale, shift = pixel_affine(IMAGENET_MEAN, IMAGENET_STD)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            times = []
            for _ in range(repeats):
                start = time.process_time()
                normalise_uint8(batch, scale, shift, fmt)
                times.append(time.process_time() - start)
            out[name] = round(statistics.median(times) * 1e3 / batch.shape[0], 3)
        return out
    finally:
        torch.set_num_threads(before)


LOADERS = ("decode_per_crop", "decode_once_float32", "decode_once_uint8")


def run(paths: list[Path], crops: int, workers: int, batch_images: int, crop_size: int,
        resize: str | None, repeats: int, cpu_repeats: int = 3) -> dict:
    """The three loaders over the same images, passes interleaved; rates in crops per second."""
    def config(n: int, dtype: str) -> CropConfig:
        return CropConfig(crop_size=crop_size, n_crops=n, resize=resize, dtype=dtype)

    repeated = [p for p in paths for _ in range(crops)]  # DEIQT: each image listed K times, one crop each
    datasets = {
        "decode_per_crop": (ImageListDataset(repeated, config(1, "float32"), train=True), batch_images * crops),
        "decode_once_float32": (ImageListDataset(paths, config(crops, "float32"), train=True), batch_images),
        "decode_once_uint8": (ImageListDataset(paths, config(crops, "uint8"), train=True), batch_images),
    }
    loaders = {name: make_loader(ds, size, workers) for name, (ds, size) in datasets.items()}
    passes: dict[str, list[dict]] = {name: [] for name in LOADERS}
    for r in range(repeats):
        order = LOADERS[r % 3:] + LOADERS[:r % 3]
        for name in order:
            n, seconds = one_pass(loaders[name], datasets[name][0], epoch=r)
            rate = n / seconds
            passes[name].append({"crops": n, "seconds": round(seconds, 3), "crops_per_s": round(rate, 1)})
            print(f"pass {r}: {name:<20} {n} crops in {seconds:6.2f} s = {rate:7.1f} crops/s", flush=True)
    rates = {name: statistics.median(p["crops_per_s"] for p in runs) for name, runs in passes.items()}
    loaders.clear()
    gc.collect()  # ends the persistent workers before the CPU passes
    cpu_runs: dict[str, dict[str, list[float]]] = {name: {"workers": [], "in_process": []} for name in LOADERS}
    for r in range(cpu_repeats):
        for name in LOADERS[r % 3:] + LOADERS[:r % 3]:
            dataset, size = datasets[name]
            cpu_runs[name]["workers"].append(cpu_per_crop(dataset, size, workers))
            cpu_runs[name]["in_process"].append(cpu_per_crop(dataset, size, 0))
    cpu_ms = {how: {name: round(statistics.median(cpu_runs[name][how]), 3) for name in LOADERS}
              for how in ("workers", "in_process")}
    uint8_set, size = datasets["decode_once_uint8"]
    norm_ms = normalisation_cost(next(iter(make_loader(uint8_set, size, 0)))["image"])
    base, cpu = "decode_per_crop", cpu_ms["workers"]
    moved = max(norm_ms.values())  # the dearer layout, so that the work moved to the model is not understated
    result = {
        "rates_crops_per_s": rates,
        "ratio_wall": {"uint8_vs_deiqt": round(rates["decode_once_uint8"] / rates[base], 2),
                       "float32_vs_deiqt": round(rates["decode_once_float32"] / rates[base], 2)},
        "cpu_ms_per_crop": cpu_ms,
        "normalise_on_model_cpu_ms_per_crop": norm_ms,
        "ratio_cpu_with_workers": {
            "uint8_vs_deiqt": round(cpu[base] / cpu["decode_once_uint8"], 2),
            "uint8_plus_normalisation_vs_deiqt": round(cpu[base] / (cpu["decode_once_uint8"] + moved), 2),
            "float32_vs_deiqt": round(cpu[base] / cpu["decode_once_float32"], 2)},
        "passes": passes,
    }
    print(f"CPU ms per crop (median of {cpu_repeats}): {cpu_ms}; model-side normalisation (1 thread): {norm_ms}",
          flush=True)
    return result


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
    load_before = load_average()
    try:
        with tempfile.TemporaryDirectory(prefix="qfm-bench-") as tmp:
            synthetic_size = CropConfig(resize=args.synthetic_size).resize  # parses WxH
            paths, source = find_images(args.images, Path(tmp), synthetic_size)
            if not paths:
                raise QfmError(f"no images found in {source}")
            paths = paths[: args.max_images]
            print(f"{len(paths)} images from {source}; K={args.crops}, workers={args.workers}, "
                  f"crop {args.crop_size}, resize {args.resize}; load average {load_before}", flush=True)
            result = run(paths, args.crops, args.workers, args.batch_images, args.crop_size, args.resize,
                         args.repeats)
    except QfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"images": len(paths), "source": source, "suffixes": sorted({p.suffix.lower() for p in paths}),
              "crops_per_image": args.crops, "workers": args.workers, "crop_size": args.crop_size,
              "resize": args.resize, "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": load_average(),
              "torch": torch.__version__, "python": platform.python_version()} | result
    rates, wall, cpu = result["rates_crops_per_s"], result["ratio_wall"], result["ratio_cpu_with_workers"]
    print(f"\n(a) decode per crop (DEIQT), float32: {rates['decode_per_crop']:8.1f} crops/s (median)")
    print(f"(b) decode once, {args.crops} crops, float32: {rates['decode_once_float32']:8.1f} crops/s (median)")
    print(f"(c) decode once, {args.crops} crops, uint8:   {rates['decode_once_uint8']:8.1f} crops/s (median)")
    print(f"wall ratio c/a {wall['uint8_vs_deiqt']:.2f}x (target >= 3x), b/a {wall['float32_vs_deiqt']:.2f}x")
    print(f"CPU (workers included) ratio c/a {cpu['uint8_vs_deiqt']:.2f}x, with the model-side normalisation "
          f"{cpu['uint8_plus_normalisation_vs_deiqt']:.2f}x, b/a {cpu['float32_vs_deiqt']:.2f}x; "
          f"load average {load_before} -> {result['load_average_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
