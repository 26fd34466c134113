"""Data-parallel training and scoring under torchrun (PyTorch DDP): one process per rank, gloo on the CPU,
NCCL on GPUs.

Run any training or scoring command unchanged under ``torchrun --nproc-per-node N -m qfm ...``: torchrun
sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; ``join`` starts the process group from them. A plain
``qfm ...`` process is rank 0 of 1 and nothing here changes what it does.

What each rank does:
- training: the sampler draws the same global batches for a given seed and epoch whatever the rank count;
  each rank trains on its own equal share of every global batch (``RankBatches``; an anchor stays with its
  QCC partner), DDP averages the gradients, so ``batch_size`` in params.yaml is the global batch; each loss
  part is normalised by its item count summed over the ranks (``qfm.losses.global_share``), so the averaged
  gradient is the one process's gradient of the global batch, however the items fall on the ranks;
- scoring passes (validation, DLE, the SNM bank's embeddings): each rank scores every N-th image and the
  per-image results are gathered on every rank (``gather_rows``), so every rank selects the same epoch;
- only rank 0 writes (checkpoints, histories, tables, plots, MLflow runs): ``is_main``.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from qfm.errors import ConfigError

#: How long a rank waits for the others at a collective before failing (a rank that died is reported by
#: torchrun at once; this bounds a hang where a rank is alive but stuck).
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank 0 of 1 outside torchrun."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the torch.distributed environment)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def ranks() -> Ranks:
    """The running job's ranks: from the process group once joined, else from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    if launched():
        return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    return Ranks()


def is_main() -> bool:
    """Whether this process writes the job's outputs (rank 0, or a process outside torchrun)."""
    return ranks().main


def join(device: torch.device) -> torch.device:
    """Start this rank's process group when torchrun launched the process (gloo on the CPU, NCCL on CUDA)
    and return the device it trains on: ``cuda:LOCAL_RANK`` on GPUs. Outside torchrun: the device as given."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return _local_device(device) if launched() else device
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run without torchrun")
    device = _local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    atexit.register(_leave)
    return device


def _local_device(device: torch.device) -> torch.device:
    if device.type != "cuda":
        return device
    local = int(os.environ["LOCAL_RANK"])
    if local >= torch.cuda.device_count():
        raise ConfigError(f"rank {os.environ['RANK']} has LOCAL_RANK {local} but this node has "
                          f"{torch.cuda.device_count()} GPU(s): give torchrun --nproc-per-node at most that")
    return torch.device("cuda", local)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(batch_size: int, what: str = "batch_size") -> int:
    """The images each rank takes from a global batch of `batch_size`; the global batch must split evenly."""
    world = ranks().world
    if batch_size % world:
        raise ConfigError(f"{what} {batch_size} (the global batch) does not split evenly over {world} ranks: "
                          f"set it to a multiple of {world}")
    return batch_size // world


class RankBatches:
    """This rank's share of each global batch a batch sampler yields: ``batch_size / world`` images, the same
    global batches whatever the rank count. With ``partners`` (the QCC pair layout: an anchor followed by its
    partner), pairs are never cut: pairs are dealt to the ranks in turn, then single images fill each share;
    a pair that fits no share (an odd share full of pairs) is trained as two single images."""

    def __init__(self, batch_sampler, rank: int, world: int,
                 partners: Mapping[int, Sequence[int]] | None = None) -> None:
        self.sampler, self.rank, self.world, self.partners = batch_sampler, rank, world, partners

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield shard_batch(list(batch), self.rank, self.world, self.partners)


def shard_batch(batch: list[int], rank: int, world: int,
                partners: Mapping[int, Sequence[int]] | None = None) -> list[int]:
    """Rank `rank`'s equal share of one global batch (see RankBatches)."""
    if len(batch) % world:
        raise ConfigError(f"a global batch of {len(batch)} images does not split evenly over {world} ranks")
    share = len(batch) // world
    if not partners:
        return batch[rank * share:(rank + 1) * share]
    from qfm.train.sampler import pairs_in_batch

    pairs = pairs_in_batch(batch, partners)
    paired = {p for pair in pairs for p in pair}
    singles = [batch[p] for p in range(len(batch)) if p not in paired]
    shares: list[list[int]] = [[] for _ in range(world)]
    for n, (a, p) in enumerate(pairs):
        target = n % world
        if len(shares[target]) + 2 <= share:
            shares[target] += [batch[a], batch[p]]
        else:
            singles += [batch[a], batch[p]]
    for r in range(world):
        need = share - len(shares[r])
        shares[r] += singles[:need]
        singles = singles[need:]
    return shares[rank]


def rank_batches(n: int, batch_size: int) -> list[list[int]]:
    """This rank's positions of a dataset of n images (every world-th, from its rank on), in batches of
    batch_size: a scoring pass's order."""
    here = ranks()
    mine = list(range(here.rank, n, here.world))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def sharded_loader(dataset, batch_size: int, workers: int = 0):
    """A scoring pass's loader over this rank's images (every image outside torchrun), in batches of
    batch_size: its results go through gather_rows."""
    from qfm.data.torch_dataset import make_loader

    return make_loader(dataset, workers=workers, batch_sampler=rank_batches(len(dataset), batch_size))


def _gathered(value) -> list:
    """Every rank's `value`, in rank order (just [value] outside torchrun)."""
    if ranks().world == 1:
        return [value]
    parts: list = [None] * ranks().world
    dist.all_gather_object(parts, value)
    return parts


def gather_rows(index: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-image results of a sharded pass, gathered from every rank and put in dataset order (index)."""
    if ranks().world == 1:
        return (index, *columns)
    parts = [p for p in _gathered((index, *columns)) if len(p[0])]
    if not parts:  # no rank had an image
        return (index, *columns)
    index = np.concatenate([p[0] for p in parts])  # a rank with no image has no rows (nor width): left out
    order = np.argsort(index, kind="stable")
    return (index[order], *(np.concatenate([p[i + 1] for p in parts])[order] for i in range(len(columns))))


def gather_dict(values: Mapping) -> dict:
    """A mapping merged from every rank (each rank contributes its own keys)."""
    return {k: v for part in _gathered(dict(values)) for k, v in part.items()}


def from_main(value):
    """Rank 0's value on every rank (e.g. a table only rank 0 computed)."""
    if ranks().world == 1:
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """`values` summed element-wise over the ranks (float64; on the GPU under NCCL); as given in one process."""
    if ranks().world == 1:
        return [float(v) for v in values]
    where = device if device.type == "cuda" else torch.device("cpu")
    total = torch.tensor(list(values), dtype=torch.float64, device=where)
    dist.all_reduce(total)
    return total.cpu().tolist()


def combine_logs(log: Mapping[str, float], count_prefix: str) -> dict[str, float]:
    """An epoch's training log over all ranks: counts (keys with `count_prefix`) summed, ``steps`` as on
    every rank, every other entry averaged over the ranks that logged it."""
    parts = _gathered(dict(log))
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        out[key] = (sum(values) if key.startswith(count_prefix)
                    else values[0] if key == "steps" else sum(values) / len(values))
    return out


class _StepModule(nn.Module):
    """One training step as a module, so that DDP sees the whole step's forward passes (the QCC step calls
    the model's encode and decode, not its forward)."""

    def __init__(self, model: nn.Module, step_fn: Callable, device: torch.device) -> None:
        super().__init__()
        self.model, self.step_fn, self.device = model, step_fn, device

    def forward(self, batch: dict):
        return self.step_fn(self.model, batch, self.device)


def data_parallel_step(model: nn.Module, step_fn: Callable, device: torch.device) -> Callable:
    """The step function training runs: `step_fn` itself in a single process; under torchrun, the step inside
    DistributedDataParallel, which averages the gradients over the ranks during backward (and broadcasts
    rank 0's weights and buffers when it wraps the model). It runs under torchrun even with one rank, so the
    wrapper's own cost can be measured (benchmarks/bench_ddp.py)."""
    if ranks().world == 1 and not (dist.is_available() and dist.is_initialized()):
        return step_fn
    wrapped = nn.parallel.DistributedDataParallel(
        _StepModule(model, step_fn, device), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True)  # some timm backbones keep parameters outside the features qfm uses

    def step(_model: nn.Module, batch: dict, _device: torch.device):
        return wrapped(batch)
    step.ddp = wrapped  # for benchmarks (communication hooks)
    return step


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so that every rank validates, and rank 0
    saves, the same model (DDP copies them only at the start of each forward)."""
    if ranks().world == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def broadcast_bytes(data: bytes | None, device: torch.device) -> bytes:
    """Rank 0's bytes on every rank (a checkpoint to resume from, which only rank 0's disk may hold)."""
    if ranks().world == 1:
        assert data is not None
        return data
    where = device if device.type == "cuda" else torch.device("cpu")
    size = torch.tensor([len(data) if is_main() else 0], dtype=torch.int64, device=where)
    dist.broadcast(size, src=0)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(where) if is_main()
              else torch.empty(int(size), dtype=torch.uint8, device=where))
    dist.broadcast(buffer, src=0)
    return buffer.cpu().numpy().tobytes()
