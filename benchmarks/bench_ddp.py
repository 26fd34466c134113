"""Data-parallel training on the CPU: 2 gloo ranks x 1 thread against 1 process x 1 thread, same global batch.

The teacher's training step of the CPU preset (benchmarks/clive_params.yaml: MobileNetV2, 224 px, 4 crops
an image, global batch 8) on a split's train images, run side by side in one invocation:

- ``1 process``: plain `qfm train-teacher`'s step, no DDP;
- ``torchrun, 1 rank``: the same under torchrun, wrapped in DistributedDataParallel (gloo): the wrapper's cost;
- ``torchrun, 2 ranks``: each rank takes 4 of the 8 images of every global batch.

With ``--device cuda`` (one GPU) the first two rows run on the GPU with NCCL: the DDP wrapper's cost there
(2 ranks on one GPU are not a configuration NCCL runs).

Reported per row: seconds per global step (median of the timed steps, data loading included), training
images/s, user and system CPU seconds, and for DDP rows the all-reduce seconds per step (the gradient
buckets' all-reduce durations, summed; they overlap the backward pass). Scaling efficiency = images/s of
2 ranks / (2 x images/s of 1 process).

    python benchmarks/bench_ddp.py --manifest M --steps 10 --json ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qfm.config import load_params
from qfm.data.manifest import read_manifest
from qfm.data.torch_dataset import ManifestCropDataset, make_loader
from qfm.runtime import resolve_device, set_threads
from qfm.train.distributed import RankBatches, data_parallel_step, gather_dict, join, ranks
from qfm.train.engine import make_optimizer
from qfm.train.fit import build_model, crop_config
from qfm.train.sampler import ShuffledBatches
from qfm.train.steps import plain_step

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "benchmarks" / "clive_params.yaml"
WARMUP = 2


def timing_hook(durations: list[float]):
    """DDP's default all-reduce (average over ranks), recording each bucket's all-reduce duration."""
    def hook(_state, bucket):
        started = time.perf_counter()
        buffer = bucket.buffer().div_(dist.get_world_size())

        def done(future):
            durations.append(time.perf_counter() - started)
            return future.value()[0]
        return dist.all_reduce(buffer, async_op=True).get_future().then(done)
    return hook


def worker(manifest: str, split: str, steps: int, out: str, device_name: str) -> None:
    """Time `steps` training steps (after WARMUP) of this process or rank; rank 0 writes the row."""
    set_threads(1)
    device = join(resolve_device(device_name))
    here = ranks()
    params = load_params(PARAMS)["train_teacher"]
    model = build_model(params).to(device).to(memory_format=torch.channels_last)
    train = ManifestCropDataset(read_manifest(manifest), split, "train", crop_config(params, model), train=True,
                                seed=params.seed)
    sampler = ShuffledBatches(len(train), params.batch_size, params.seed)
    loader = make_loader(train, batch_sampler=RankBatches(sampler, here.rank, here.world) if here.world > 1
                         else sampler)
    step = data_parallel_step(model, plain_step, device)
    durations: list[float] = []
    if hasattr(step, "ddp"):
        step.ddp.register_comm_hook(None, timing_hook(durations))
    optimizer = make_optimizer(model, params.lr, params.weight_decay)
    model.train()
    seconds, comm = [], []
    usage = None
    last = time.perf_counter()
    for n, batch in enumerate(loader):
        if n == WARMUP:
            usage = resource.getrusage(resource.RUSAGE_SELF)
        durations.clear()
        loss, _ = step(model, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if n >= WARMUP:
            seconds.append(now - last)
            comm.append(sum(durations))
        last = now
        if n + 1 == WARMUP + steps:
            break
    end = resource.getrusage(resource.RUSAGE_SELF)
    mine = {here.rank: {"step_s": statistics.median(seconds), "allreduce_s": statistics.median(comm),
                        "user_s": end.ru_utime - usage.ru_utime, "sys_s": end.ru_stime - usage.ru_stime}}
    every = gather_dict(mine)
    if here.main:
        step_s = max(r["step_s"] for r in every.values())  # the job moves at its slowest rank
        Path(out).write_text(json.dumps({
            "ranks": here.world, "global_batch": params.batch_size, "crops_per_image": params.n_crops,
            "steps": steps, "step_s": step_s, "images_per_s": params.batch_size / step_s,
            "allreduce_s": statistics.mean(r["allreduce_s"] for r in every.values()) if hasattr(step, "ddp") else None,
            "user_s": sum(r["user_s"] for r in every.values()), "sys_s": sum(r["sys_s"] for r in every.values()),
            "per_rank": every}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="an ingested manifest folder (e.g. clive-dev's)")
    parser.add_argument("--split", default="split_0")
    parser.add_argument("--steps", type=int, default=10, help="timed global steps, after 2 warm-up steps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.manifest, args.split, args.steps, args.worker, args.device)
    folder = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    me = [str(Path(__file__).resolve()), "--manifest", args.manifest, "--split", args.split, "--steps",
          str(args.steps), "--device", args.device]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    commands = {"1 process": [sys.executable, *me],
                "torchrun, 1 rank": [*torchrun, "--nproc-per-node=1", *me],
                "torchrun, 2 ranks": [*torchrun, "--nproc-per-node=2", *me]}
    if args.device == "cuda":
        del commands["torchrun, 2 ranks"]
    rows = {}
    for name, command in commands.items():
        out = folder / f"{len(rows)}.json"
        subprocess.run([*command, "--worker", str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows[name] = json.loads(out.read_text())
    base = rows["1 process"]["images_per_s"]
    for row in rows.values():
        row["scaling_efficiency"] = row["images_per_s"] / (row["ranks"] * base)
    print(f"{'run':20} {'s/step':>7} {'images/s':>9} {'efficiency':>10} {'all-reduce s/step':>18} {'user s':>7} "
          f"{'sys s':>6}")
    for name, row in rows.items():
        reduce = "" if row["allreduce_s"] is None else f"{row['allreduce_s']:.3f}"
        print(f"{name:20} {row['step_s']:7.2f} {row['images_per_s']:9.2f} {row['scaling_efficiency']:10.2f} "
              f"{reduce:>18} {row['user_s']:7.1f} {row['sys_s']:6.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
