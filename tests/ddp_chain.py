"""What tests/test_distributed.py runs, plainly or under torchrun (each rank runs this script):

    python tests/ddp_chain.py [--gradients FILE] [--steps K] [--stop] [--summed-gradients] chain MANIFEST TEACHER PARAMS OUT
    python tests/ddp_chain.py [...] qfm STEP ARGS...

``chain``: the DLE -> SNM -> QCC student chain in one process; ``qfm``: one qfm command line.
Test-only instruments (none of them exists outside this script):
- ``--gradients FILE``: rank 0 saves the gradients the optimiser receives at its first K optimiser steps
  (after DDP's reduction), one list of tensors per step in the optimiser's parameter order;
  ``--stop`` ends the run there (every rank stops at the same step);
- ``--summed-gradients``: a DDP communication hook that sums the ranks' gradients instead of averaging them,
  the bug the equality test must catch."""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook


def record_gradients(path: Path, steps: int, stop: bool) -> None:
    """Save (rank 0) the gradients of the first `steps` optimiser steps to `path`; with `stop`, exit after them."""
    recorded: list[list[torch.Tensor]] = []

    def hook(optimizer, _args, _kwargs) -> None:
        if len(recorded) == steps:
            return
        recorded.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                         for group in optimizer.param_groups for p in group["params"]])
        if len(recorded) == steps:
            if os.environ.get("RANK", "0") == "0":
                torch.save(recorded, path)
            if stop:
                raise SystemExit(0)

    register_optimizer_step_pre_hook(hook)


def sum_gradients_instead_of_averaging() -> None:
    """Register a summing communication hook on the DDP wrapper that training builds."""
    import qfm.train.fit as fit_module

    def summed(_state, bucket):
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda done: done.value()[0])

    original = fit_module.data_parallel_step

    def step_with_summed_gradients(model, step_fn, device):
        step = original(model, step_fn, device)
        step.ddp.register_comm_hook(None, summed)
        return step

    fit_module.data_parallel_step = step_with_summed_gradients


def chain(manifest: str, teacher: str, params_file: str, out: str) -> None:
    from qfm.config import load_params
    from qfm.steps.bank import build_bank
    from qfm.steps.pseudo_label import pseudo_label
    from qfm.steps.student import train_student

    params, out_dir = load_params(params_file), Path(out)
    pseudo_label(manifest, teacher, out_dir / "pseudo", params["pseudo_label"], params["run"], progress=False)
    build_bank(manifest, teacher, out_dir / "pseudo", out_dir / "bank", params["build_bank"], params["run"],
               progress=False)
    train_student(manifest, out_dir / "student", params["train_student"], params["run"], teacher_dir=teacher,
                  pseudo_dir=out_dir / "pseudo", bank_dir=out_dir / "bank", progress=False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gradients", type=Path)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--stop", action="store_true")
    parser.add_argument("--summed-gradients", action="store_true")
    parser.add_argument("what", choices=["chain", "qfm"])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.gradients:
        record_gradients(args.gradients, args.steps, args.stop)
    if args.summed_gradients:
        sum_gradients_instead_of_averaging()
    if args.what == "chain":
        chain(*args.args)
        return 0
    from qfm.cli import main as qfm_main

    return qfm_main(args.args)


if __name__ == "__main__":
    sys.exit(main())
