"""Where a CPU training step's time goes, operator by operator (torch.profiler).

Trains the CPU preset (`qfm_mobilenetv2`, channels-last, 8 images x 4 crops of 224 as one batch of 32, the
plain DEIQT loss, AdamW, gradient clipping) on a fixed random batch, on --threads torch threads, and prints
the seconds per step and the operators that took the most self time over --steps profiled steps.

    python benchmarks/profile_train_step.py --threads 1 --steps 3
    python benchmarks/profile_train_step.py --threads 1 --freeze-blocks 2
"""

from __future__ import annotations

import argparse
import time

import torch

import qfm.runtime  # noqa: F401 -- the product's allocator settings, as in training
from qfm.losses import quality_loss
from qfm.models import create_model
from qfm.train.engine import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up and 5 timed ones)")
    parser.add_argument("--freeze-blocks", type=int, default=0, help="model_options.freeze_blocks")
    parser.add_argument("--rows", type=int, default=20, help="operators to list")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("qfm_mobilenetv2", freeze_blocks=args.freeze_blocks).to(memory_format=torch.channels_last)
    model.train()
    optimizer = make_optimizer(model, 2e-4, 0.05)
    images = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    targets = torch.rand(32)

    def step() -> None:
        loss = quality_loss(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    step(), step()
    started = time.perf_counter()
    for _ in range(5):
        step()
    print(f"{(time.perf_counter() - started) / 5:.2f} s/step on {args.threads} thread(s), "
          f"freeze_blocks={args.freeze_blocks}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
