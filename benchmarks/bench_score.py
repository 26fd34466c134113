"""Scoring speed, side by side in one run on the same images and the same crops (deterministic 3x3 test grid):

  eager            torch as a plain user runs it: float32 crops normalised on the loader, contiguous model,
                   torch.no_grad
  torch            `qfm score --engine torch`: uint8 crops, channels-last model, the product's thread and
                   loader settings (runtime CPU settings)
  onnxruntime      `qfm score --engine onnxruntime`: the fp32 ONNX export (qfm export)
  onnxruntime-int8 onnxruntime's static int8 form (qfm.quantize, calibrated on 32 other images); speed only:
                   whether int8 may be used is `qfm export --int8`'s validation gate
  onnxruntime, 1 loader worker   the same, decoding and cropping on a loader process (overlap)

For each: images/s end to end (decode, crop, model, mean over crops), the model alone on crops already cut
(crops/s), CPU seconds (user, system) of the end-to-end pass, and the fraction of the FLOP roofline (FLOPs
per crop from torch's FlopCounterMode x crops/s, against the best fp32 matmul rate measured here on the
same threads). Then the per-image time of a large JPEG with and without reduced-size decoding (`--large`).

    python benchmarks/bench_score.py --checkpoint T/best.safetensors --images 64 --large --json score.json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from qfm.data.torch_dataset import CropConfig, ImageListDataset, make_loader
from qfm.export import export_model
from qfm.inference import score_files
from qfm.onnx_engine import load_onnx_model
from qfm.quantize import quantize_file
from qfm.runtime import loader_workers, resolve_device
from qfm.train.fit import load_trained_model

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


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def timed(run) -> dict:
    """Wall, user and system seconds of run() (the second call; the first warms up)."""
    run()
    user, system = cpu_seconds()
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    user2, system2 = cpu_seconds()
    return {"wall_s": wall, "user_s": user2 - user, "sys_s": system2 - system}


def eager_scorer(checkpoint: Path, paths: list[Path], crop: CropConfig, batch: int):
    """A plain torch user: float32 crops normalised in the loader, contiguous model, no_grad."""
    model, _ = load_trained_model(checkpoint, "cpu")
    model = model.to(memory_format=torch.contiguous_format).eval()
    config = CropConfig(**(vars(crop) | {"dtype": "float32"}))
    loader = make_loader(ImageListDataset(paths, config), batch, 0)

    def run() -> None:
        with torch.no_grad():
            for item in loader:
                model(item["image"])
    return run


def model_only(model, crops, batch: int):
    """The model on crops already cut (a uint8 channels-last torch view, or NHWC numpy for onnxruntime), batch
    by batch."""
    def run() -> None:
        with torch.inference_mode():
            for start in range(0, len(crops), batch):
                model(crops[start:start + batch])
    return run


def large_jpeg_times(folder: Path, source: Path, crop: CropConfig, repeats: int = 3) -> dict:
    """Per-image seconds to decode and cut the test crops of a 4000x3000 JPEG, full decode against reduced-size
    decode, with the crop settings' resize set to short_side=768 (a model that only sees a resized image)."""
    from PIL import Image

    big = folder / "large.jpg"
    Image.open(source).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(big, quality=92)
    out = {}
    for name, reduced in (("full_decode", False), ("reduced_decode", True)):
        config = CropConfig(**(vars(crop) | {"resize": "short_side=768", "reduced_decode": reduced}))
        dataset = ImageListDataset([big], config)
        dataset[0]
        start = time.perf_counter()
        for _ in range(repeats):
            dataset[0]
        out[name] = (time.perf_counter() - start) / repeats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained best.safetensors (e.g. a clive-dev teacher)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--large", action="store_true", help="also time a 4000x3000 JPEG, full and reduced decode")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = resolve_device("cpu")  # as qfm score: the allocator and thread settings of the runtime
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    checkpoint = Path(args.checkpoint)
    torch_model, state = load_trained_model(checkpoint, device)
    crop = CropConfig(**state["crop"])
    paths = sorted(CLIVE.glob("*.JPG")) if CLIVE.is_dir() else []
    if len(paths) < args.images + 32:
        raise SystemExit(f"needs {args.images + 32} JPEG images in {CLIVE}")
    paths, calibration = paths[: args.images], paths[args.images: args.images + 32]
    export_model(checkpoint, "onnx", work / "fp32.onnx")
    quantize_file(work / "fp32.onnx", work / "int8.onnx", ImageListDataset(calibration, crop))
    engines = {"torch": (torch_model, state), "onnxruntime": load_onnx_model(work / "fp32.onnx"),
               "onnxruntime-int8": load_onnx_model(work / "int8.onnx")}
    crops = torch.cat([ImageListDataset(paths, crop)[i]["image"] for i in range(len(paths))])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        torch_model(crops[:1])
    flops_per_crop = counter.get_total_flops()
    rate = matmul_rate()
    workers = loader_workers("auto", device)
    rows = {"eager": timed(eager_scorer(checkpoint, paths, crop, args.batch)) | {"model_crops_per_s": None}}
    rows["eager"]["model_crops_per_s"] = len(crops) / timed(model_only(
        load_trained_model(checkpoint, "cpu")[0].to(memory_format=torch.contiguous_format).eval(),
        crops.float().contiguous() * torch_model.pixel_scale - torch_model.pixel_shift, args.batch))["wall_s"]
    for name, (model, model_state) in engines.items():
        row = timed(lambda m=model, s=model_state: score_files(m, s, paths, device=device, batch_size=args.batch,
                                                               workers=workers, progress=False))
        # onnxruntime takes the crops as numpy NHWC uint8 (the memory the channels-last view already has)
        given = crops if name == "torch" else crops.permute(0, 2, 3, 1).numpy()
        row["model_crops_per_s"] = len(crops) / timed(model_only(model, given, args.batch))["wall_s"]
        rows[name] = row
    for name, row in rows.items():
        row["images_per_s"] = len(paths) / row["wall_s"]
        row["roofline_fraction"] = row["model_crops_per_s"] * flops_per_crop / rate
    result = {"images": len(paths), "crops_per_image": crop.n_test_crops, "batch": args.batch,
              "threads": torch.get_num_threads(), "workers": workers, "gflops_per_crop": flops_per_crop / 1e9,
              "matmul_gflop_s": rate / 1e9, "rows": rows}
    print(f"{len(paths)} images x {crop.n_test_crops} crops, {torch.get_num_threads()} threads, {workers} loader "
          f"workers; {flops_per_crop / 1e9:.3f} GFLOP a crop; fp32 matmul {rate / 1e9:.0f} GFLOP/s")
    base = rows["eager"]["images_per_s"]
    print(f"{'engine':30} {'images/s':>9} {'x eager':>8} {'user s':>7} {'sys s':>6} {'model crops/s':>14} {'roofline':>9}")
    for name, row in rows.items():
        print(f"{name:30} {row['images_per_s']:9.2f} {row['images_per_s'] / base:8.2f} {row['user_s']:7.1f} "
              f"{row['sys_s']:6.1f} {row['model_crops_per_s']:14.1f} {100 * row['roofline_fraction']:8.1f}%")
    if args.large:
        result["large_jpeg_s"] = large_jpeg_times(work, paths[0], crop)
        print("4000x3000 JPEG, decode + test crops at short_side=768: " + ", ".join(
            f"{k} {v:.3f} s" for k, v in result["large_jpeg_s"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
