"""How a qfm process uses the machine: the device, torch's threads, DataLoader workers and the allocator.

Measured on 2 CPU cores (benchmarks/README.md, "CPU settings"), three things wasted a third of a training
run's CPU time and more of scoring's:

- glibc hands every large freed block (a batch's activations, hundreds of MB) back to the kernel and the
  next step faults it in again page by page: about 2 GB of page faults a training step, a fifth of the
  CPU time spent in the kernel. ``tune_allocator`` keeps freed memory in the process instead.
- DataLoader worker processes compete with torch's threads for the same cores, and torch's OpenMP threads
  wait for a preempted thread at every barrier. Decoding and cropping are 1-3% of a CPU training step, so
  on a CPU with few cores the loader runs in the training process (``loader_workers``: 'auto').
- Convolutions on the CPU run faster in channels-last memory (the layout the loader's crops already have).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from qfm.errors import ConfigError

AUTO = "auto"
# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_tuned: bool | None = None


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc: no mmap for large blocks, no trimming); once per process.

    Returns whether the allocator was tuned (False where libc is not glibc). The cost: the process keeps
    its peak heap until it exits, which a training or scoring process reaches anyway.
    """
    global _tuned
    if _tuned is None:
        _tuned = False
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None)
            if mallopt is not None:
                _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
        except OSError:
            _tuned = False
    return _tuned


def resolve_device(name: str | torch.device = AUTO) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; the process's allocator is tuned for model work."""
    tune_allocator()
    if isinstance(name, torch.device):
        return name
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but no CUDA GPU is available; use device: auto or cpu")
    return torch.device(name)


def loader_workers(setting: int | str, device: torch.device, *, name: str = "workers") -> int:
    """DataLoader worker processes: a number as given, or 'auto' from the device and the core count.

    auto: on a GPU, every core but one (at most 8) decodes while the GPU computes; on the CPU, the model
    needs the cores, so the loader runs in the process below 8 cores and takes one worker per 8 above.
    """
    if setting == AUTO:
        cores = available_cores()
        if device.type == "cuda":
            return max(1, min(8, cores - 1))
        return 0 if cores < 8 else cores // 8
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ConfigError(f"{name} must be 'auto' or a whole number >= 0 (DataLoader worker processes), "
                          f"got {setting!r}")
    return setting


def set_threads(threads: int, *, name: str = "run.threads") -> int:
    """torch's intra-op threads: 0 leaves torch's own choice (the core count); returns the count in use."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"{name} must be 0 (torch's default: every core) or a positive number, got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
