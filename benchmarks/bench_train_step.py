"""Student step with SNM/QCC against the plain step: same backbone, same batch, time per training image.

Both steps see the same real images (K crops each). The QCC batch pairs every anchor with a partner in
the same batch (the pair-aware sampler's layout), so QCC adds one decoder pass over the anchors' tokens.
Runs alternate between the two steps and the median per step is reported. Target: <= 1.2x.

    python benchmarks/bench_train_step.py --batch 8 --crops 4 --steps 6 --json step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from qfm.data.torch_dataset import CropConfig, ImageListDataset, collate_crops
from qfm.losses import LossWeights
from qfm.models import create_model
from qfm.runtime import resolve_device
from qfm.train.engine import make_optimizer
from qfm.train.steps import QccStep, plain_step

REPO = Path(__file__).resolve().parents[1]
CLIVE = REPO.parent / "shared/datasets/clive-dev/ChallengeDB_release/Images"


def images(n: int) -> list[Path]:
    if CLIVE.is_dir():
        return sorted(CLIVE.glob("*.JPG"))[:n]
    from tempfile import mkdtemp

    from qfm.data.demo import make_demo

    root = Path(mkdtemp())
    make_demo(root, n_references=4, n_scenes=0, progress=False)
    return sorted((root / "images").glob("*.png"))[:n]


def timed_step(model, optimizer, step, batch) -> float:
    start = time.perf_counter()
    loss, _ = step(model, batch, torch.device("cpu"))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qfm_mobilenetv2")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--crops", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each kind")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    resolve_device("cpu")  # as training does: the allocator keeps freed memory
    model = create_model(args.model).to(memory_format=torch.channels_last)  # as fit() lays it out
    dataset = ImageListDataset(images(args.batch), CropConfig(n_crops=args.crops, mean=model.mean, std=model.std),
                               train=True)
    batch = collate_crops([dataset[i] | {"mos": torch.tensor(0.1 * (i % 10))} for i in range(args.batch)])
    partners = {i: [i + 1] for i in range(0, args.batch - 1, 2)}  # anchors 0, 2, 4 ... with the next image
    qcc = QccStep(partners, np.zeros(args.batch, dtype=bool), LossWeights(lambda_qcc=1.0), alpha=0.5)
    optimizer = make_optimizer(model, 2e-4, 0.05)
    model.train()
    for step in (plain_step, qcc):  # warm-up
        timed_step(model, optimizer, step, batch)
    plain_times, qcc_times = [], []
    for _ in range(args.steps):
        plain_times.append(timed_step(model, optimizer, plain_step, batch))
        qcc_times.append(timed_step(model, optimizer, qcc, batch))
    plain, with_qcc = statistics.median(plain_times), statistics.median(qcc_times)
    result = {"model": args.model, "batch_images": args.batch, "crops_per_image": args.crops,
              "anchors_with_partner": len(partners), "threads": torch.get_num_threads(),
              "plain_s_per_image": plain / args.batch, "qcc_s_per_image": with_qcc / args.batch,
              "ratio": with_qcc / plain, "target": "<= 1.2", "plain_steps_s": plain_times, "qcc_steps_s": qcc_times}
    print(f"plain step: {plain / args.batch * 1000:.1f} ms/image; QCC step: {with_qcc / args.batch * 1000:.1f} ms/image; "
          f"ratio {with_qcc / plain:.3f} (target <= 1.2)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
