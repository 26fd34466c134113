"""GPU training smoke of the paper's configuration: `deiqt_vit_s` (DeiT III ViT-S/16 at 224), bf16 autocast,
channels_last, AdamW + warm-up/cosine, for a few hundred steps on the JPEG images of clive-dev.

Reports crops/s over the timed steps, peak GPU memory and the loss at the start and end. Throughput does
not depend on the weights, so where timm's hub is unreachable it trains from random init (say so).

    python benchmarks/gpu_train_vit.py --steps 300 --batch 16 --crops 4 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qfm.data.adapters import read_dataset
from qfm.data.manifest import build_manifest
from qfm.data.torch_dataset import CropConfig, ManifestCropDataset, make_loader
from qfm.errors import QfmError
from qfm.models import create_model
from qfm.train.engine import autocast, make_optimizer, make_scheduler, to_device
from qfm.train.sampler import ShuffledBatches
from qfm.train.steps import plain_step

REPO = Path(__file__).resolve().parents[1]
CLIVE = REPO.parent / "shared/datasets/clive-dev/ChallengeDB_release"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(CLIVE), help="a LIVEC release folder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--crops", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (for the side-by-side figure)")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script itself")
    parser.add_argument("--reuse-batch", action="store_true",
                        help="train on one batch kept on the GPU: the model's own ceiling, no loader")
    parser.add_argument("--profile", metavar="FILE", help="write torch.profiler's op table of steps 20-29 here")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this script measures GPU training")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    try:
        model, weights = create_model("deiqt_vit_s", pretrained=True), "timm hub (ImageNet)"
    except QfmError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, weights = create_model("deiqt_vit_s", pretrained=False, allow_random_init=True), "random init"
    model = model.to(device).to(memory_format=torch.channels_last)
    raw = read_dataset("livec", args.root)
    raw.table = raw.table[raw.table["path"].str.upper().str.endswith(".JPG")]  # the JPEG images only
    manifest = build_manifest(raw, progress=False)
    crops = CropConfig(n_crops=args.crops, mean=model.mean, std=model.std)
    dataset = ManifestCropDataset(manifest, None, None, crops, train=True)
    sampler = ShuffledBatches(len(dataset), args.batch)
    loader = make_loader(dataset, workers=args.workers, batch_sampler=sampler, pin_memory=cuda)
    optimizer = make_optimizer(model, 2e-4, 0.05)
    scheduler = make_scheduler(optimizer, args.steps, args.steps // 10)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, step, epoch, timed_crops, start, profiler = [], 0, 0, 0, None, None
    kept = kept_batch(loader, device) if args.reuse_batch else None
    model.train()
    while step < args.steps:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for batch in ([kept] * len(loader) if args.reuse_batch else loader):
            if step == min(10, args.steps - 1):  # the first steps include cuDNN/cuBLAS warm-up
                synchronize(device)
                start, timed_crops = time.perf_counter(), 0
            if args.profile and step in (20, 30):
                profiler = toggle_profiler(profiler if step == 30 else None, args.profile)
            batch["image"] = to_device(batch["image"], device)
            with autocast(device, not args.fp32):
                loss, _ = plain_step(model, batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())  # no host sync inside the timed loop
            timed_crops += batch["image"].shape[0]
            step += 1
            if step >= args.steps:
                break
        epoch += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    losses = torch.stack(losses).float().cpu().numpy()
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "weights": weights, "images": len(dataset), "steps": args.steps,
              "batch_images": args.batch, "crops_per_image": args.crops, "precision": "fp32" if args.fp32 else "bf16 autocast",
              "input": "one batch reused on the GPU" if args.reuse_batch else f"loader, {args.workers} workers",
              "crops_per_s": timed_crops / seconds, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "loss_first_10": float(np.mean(losses[:10])), "loss_last_10": float(np.mean(losses[-10:]))}
    print(pd.Series(result).to_string())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def kept_batch(loader, device: torch.device) -> dict:
    """One real batch, moved to the device once (for --reuse-batch)."""
    batch = next(iter(loader))
    batch["image"] = to_device(batch["image"], device)
    return batch


def toggle_profiler(profiler, path: str):
    """Start a profiler (None given) or stop the given one and write its op table sorted by device time."""
    if profiler is None:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
        profiler.__enter__()
        return profiler
    torch.cuda.synchronize()
    profiler.__exit__(None, None, None)
    table = profiler.key_averages().table(sort_by="self_device_time_total", row_limit=25)
    Path(path).write_text(table + "\n")
    print(table)
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
