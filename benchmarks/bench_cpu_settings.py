"""Where a CPU training step's time goes: the allocator, the memory layout, torch threads and loader workers.

Each configuration trains the CPU preset (`qfm_mobilenetv2`, batch 8 images x 4 crops of 224, the DEIQT
step) on real images through the product's loader, in a fresh process, for --steps steps after two
untimed ones, and reports wall and CPU seconds per step, split into user and system time, and the page
faults per step. The configurations add the product's settings one at a time:

  before        glibc's default allocator, contiguous layout, 2 torch threads, 2 loader workers
                (the settings before qfm.runtime existed)
  +allocator    freed memory kept in the process (qfm.runtime.tune_allocator)
  +channels     the model in channels-last memory, as the loader's crops already are
  +no-workers   the loader in the training process (workers: auto on a CPU under 8 cores): the product
  1-thread      the product's settings on one torch thread
  2 jobs        two 1-thread processes at once (what `qfm study --jobs 2` runs on 2 cores): their
                crops/s summed, the other figures per process
  frozen 2      the same with model_options.freeze_blocks: 2 (the stem and the first two blocks keep their
                ImageNet weights and statistics, so backward stops before the 112- and 56-pixel maps)

    python benchmarks/bench_cpu_settings.py --steps 12 --json cpu.json
    python benchmarks/bench_cpu_settings.py --images demo

--images: a folder, a manifest folder, or `demo` (the demo dataset, made in a temporary folder); default:
the shared clive-dev images next to the repository when present, else the demo.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "before": {"tune": False, "channels_last": False, "threads": 2, "workers": 2},
    "+allocator": {"tune": True, "channels_last": False, "threads": 2, "workers": 2},
    "+channels": {"tune": True, "channels_last": True, "threads": 2, "workers": 2},
    "+no-workers": {"tune": True, "channels_last": True, "threads": 2, "workers": 0},
    "1-thread": {"tune": True, "channels_last": True, "threads": 1, "workers": 0},
    "2 jobs": {"tune": True, "channels_last": True, "threads": 1, "workers": 0, "processes": 2},
    "+frozen 2": {"tune": True, "channels_last": True, "threads": 2, "workers": 0, "freeze_blocks": 2},
    "1-thread frozen 2": {"tune": True, "channels_last": True, "threads": 1, "workers": 0, "freeze_blocks": 2},
    "2 jobs frozen 2": {"tune": True, "channels_last": True, "threads": 1, "workers": 0, "processes": 2,
                         "freeze_blocks": 2},
}
CLIVE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clive-dev" / "ChallengeDB_release" / "Images"


def _images(choice: str | None, tmp: Path) -> list[Path]:
    from qfm.data.images import list_images

    if choice == "demo" or (choice is None and not CLIVE.is_dir()):
        from qfm.data.demo import make_demo

        make_demo(tmp / "demo", progress=False)
        return list_images(tmp / "demo" / "images")
    folder = Path(choice) if choice else CLIVE
    return [p for p in list_images(folder) if "trainingImages" not in p.parts]


def child(config: dict, images: list[str], steps: int) -> dict:
    """Train `steps` timed steps under one configuration; runs in its own process."""
    import qfm.runtime

    if not config["tune"]:
        qfm.runtime._tuned = False  # as before: glibc's defaults (tune_allocator then does nothing)
    import torch

    from qfm.data.torch_dataset import CropConfig, ImageListDataset, make_loader
    from qfm.losses import quality_loss
    from qfm.models import create_model
    from qfm.runtime import resolve_device
    from qfm.train.engine import make_optimizer, to_device

    device = resolve_device("cpu")
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = create_model("qfm_mobilenetv2", freeze_blocks=config.get("freeze_blocks", 0))
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = make_optimizer(model, 2e-4, 0.05)
    crops = CropConfig.from_data_config(model.data_config, n_crops=4)
    dataset = ImageListDataset([Path(p) for p in images], crops, train=True)
    loader = make_loader(dataset, 8, config["workers"], shuffle=True, drop_last=True)
    batches = [iter(loader)]  # a holder, emptied at the end so that the workers stop

    def step() -> None:
        batch = next(batches[0])
        pred = model(to_device(batch["image"], device))
        loss = quality_loss(pred, torch.rand(pred.shape[0]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(), step()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(steps):
        step()
    wall = time.perf_counter() - started
    after, children_after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    batches.clear()  # ends the workers, so that their CPU time is counted below
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user = after.ru_utime - before.ru_utime + children_after.ru_utime - children.ru_utime
    system = after.ru_stime - before.ru_stime + children_after.ru_stime - children.ru_stime
    return {"wall_s_per_step": wall / steps, "user_s_per_step": user / steps, "system_s_per_step": system / steps,
            "crops_per_s": 32 * steps / wall, "system_share": system / max(user + system, 1e-9),
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder, manifest folder or 'demo' (default: clive-dev when present)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration (default 12)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(Path(args.child).read_text())
        print(json.dumps(child(job["config"], job["images"], job["steps"])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        images = [str(p) for p in _images(args.images, Path(tmp))]
        results = {}
        print(f"{len(images)} images, {args.steps} timed steps of 8 images x 4 crops per configuration")
        print(f"{'configuration':<18} {'wall s/step':>11} {'user s':>7} {'sys s':>6} {'sys share':>9} "
              f"{'crops/s':>8} {'faults/step':>11}")
        for name in args.configs.split(","):
            spec = Path(tmp) / "config.json"
            spec.write_text(json.dumps({"config": CONFIGS[name], "images": images, "steps": args.steps}))
            procs = [subprocess.Popen([sys.executable, __file__, "--child", str(spec)], stdout=subprocess.PIPE,
                                      text=True) for _ in range(CONFIGS[name].get("processes", 1))]
            runs = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
            r = results[name] = CONFIGS[name] | {k: sum(x[k] for x in runs) / len(runs) for k in runs[0]}
            r["crops_per_s"] = sum(x["crops_per_s"] for x in runs)
            print(f"{name:<18} {r['wall_s_per_step']:>11.2f} {r['user_s_per_step']:>7.2f} "
                  f"{r['system_s_per_step']:>6.2f} {r['system_share']:>9.1%} {r['crops_per_s']:>8.1f} "
                  f"{r['page_faults_per_step']:>11.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
