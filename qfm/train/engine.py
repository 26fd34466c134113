"""Engine functions that know nothing of MLflow, DVC or Kubeflow: optimiser, schedule, one epoch, predict."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qfm.data.torch_dataset import per_image
from qfm.errors import ConfigError
from qfm.losses import check_finite

StepFn = Callable[[nn.Module, dict, torch.device], tuple[torch.Tensor, dict[str, float]]]
SCHEDULES = ("cosine", "step", "constant")
COUNT_PREFIX = "n_"  # a step log entry that counts things: summed over an epoch, not averaged


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on GPU (the DEIQT recipe's mixed precision); plain fp32 on the CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings and queries (1-D tensors)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   schedule: str = "cosine", step_every: int = 0,
                   gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero, step decay (x gamma every step_every steps) or constant."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got '{schedule}'")
    total_steps, warmup_steps = max(1, total_steps), max(0, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "step" and step_every > 0:
            return gamma ** ((step - warmup_steps) // step_every)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model: nn.Module, loader: DataLoader, step_fn: StepFn, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, *, epoch: int,
                    clip_grad: float = 5.0, amp: bool = True, progress: bool = True,
                    on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass over the loader; returns the number of steps, every logged loss part averaged over the steps
    that logged it (loss_qcc: over the steps that had anchor-partner pairs), and every count (a key that
    starts with ``n_``, e.g. n_qcc_pairs) summed over the epoch.

    A non-finite loss stops training with the step and the batch's image ids named (NonFiniteLossError)
    before any optimiser update, so the last checkpoint stays good.
    """
    model.train()
    sums: dict[str, float] = {}
    logged: dict[str, int] = {}
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False)
    for batch in bar:
        with autocast(device, amp):
            loss, log = step_fn(model, batch, device)
        global_step = int(scheduler.last_epoch)
        check_finite(loss, global_step, batch.get("image_id"), log)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        scheduler.step()
        steps += 1
        for key, value in log.items():
            sums[key] = sums.get(key, 0.0) + value
            logged[key] = logged.get(key, 0) + 1
        bar.set_postfix(loss=f"{log['loss']:.4f}")
        if on_step is not None:
            on_step(global_step)
    if steps == 0:
        raise ConfigError("the training loader yielded no batch: the training part is empty or smaller "
                          "than one batch with drop_last")
    return {key: value if key.startswith(COUNT_PREFIX) else value / logged[key]
            for key, value in sums.items()} | {"steps": steps}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool = True,
            progress: bool = True, desc: str = "predict") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic multi-crop prediction: (dataset index, mean over crops, std over crops) per image."""
    model.eval()
    preds, crop_index = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        images = batch["image"]
        if images.shape[0] == 0:
            continue
        with autocast(device, amp):
            out = model(to_device(images, device))
        preds.append(out.float().cpu())
        crop_index.append(batch["crop_index"])
    if not preds:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
    index, mean, std = per_image(torch.cat(preds), torch.cat(crop_index))
    return index.numpy(), mean.numpy(), std.numpy()


@torch.no_grad()
def embed(model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool = True,
          progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-image SNM descriptors: the model's L2-normalised embedding averaged over crops, re-normalised."""
    model.eval()
    sums: dict[int, torch.Tensor] = {}
    for batch in tqdm(loader, desc="embed", unit="batch", disable=not progress, leave=False):
        with autocast(device, amp):
            feats = model.embed(to_device(batch["image"], device)).float().cpu()
        for i, feat in zip(batch["crop_index"].tolist(), feats):
            sums[i] = sums[i] + feat if i in sums else feat.clone()
    index = np.array(sorted(sums), dtype=np.int64)
    matrix = torch.stack([sums[i] for i in index]) if len(index) else torch.zeros(0, 1)
    return index, torch.nn.functional.normalize(matrix, dim=-1).numpy().astype(np.float32)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a crop batch to the device (channels_last on GPU, as the recipe asks), keeping its dtype:
    uint8 crops (already channels-last, 1 byte a value) are normalised by the model on the device."""
    if device.type == "cuda":
        return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return images.to(device)
