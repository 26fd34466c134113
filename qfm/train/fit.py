"""The training loop shared by teacher and student: model selection on the validation part, a checkpoint
each epoch (model, optimiser, scheduler, RNG states, epoch, history) and exact resumption."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from qfm.config import TrainParams
from qfm.data.splits import ids_digest
from qfm.data.torch_dataset import CropConfig, ManifestCropDataset, make_loader
from qfm.errors import ConfigError, DataError
from qfm.eval.metrics import check_metric, compute_metrics, gain
from qfm.faults import pause_point
from qfm.models import create_model
from qfm.runtime import loader_workers, resolve_device
from qfm.train.checkpoint import (
    BEST,
    LAST,
    decode_checkpoint,
    load_checkpoint,
    read_checkpoint_bytes,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from qfm.train.distributed import (
    RankBatches,
    broadcast_bytes,
    combine_logs,
    data_parallel_step,
    from_main,
    gather_rows,
    per_rank_batch,
    ranks,
    sharded_loader,
    sync_buffers,
)
from qfm.train.engine import COUNT_PREFIX, StepFn, make_optimizer, make_scheduler, predict, train_one_epoch
from qfm.train.sampler import ShuffledBatches

HISTORY = "history.json"
#: How the saved model is chosen (params.select): the epoch best on validation, the last epoch, or the mean
#: of the weights of the last params.average_epochs epochs (validated once, after the last epoch).
SELECTIONS = ("best", "last", "average")
#: Parameters that change how a run executes but not what it computes: a resume may differ in them.
EXECUTION_ONLY = ("workers",)


@dataclass
class FitResult:
    best_epoch: int
    best_val: dict
    history: list[dict]
    model_path: Path
    seconds: float
    selected_on: str = "val srcc"


def build_model(params: TrainParams):
    """The model named in params (its weights from model_options, the preset's offline default otherwise),
    its freshly initialised parts (projection, decoder) seeded from params.seed."""
    seed_everything(params.seed)
    return create_model(params.model, **params.model_options)


def crop_config(params: TrainParams, model: nn.Module) -> CropConfig:
    """Crops from params (uint8, normalised by the model), mean/std from the model's own weights config."""
    return CropConfig(crop_size=params.crop_size, n_crops=params.n_crops, test_grid=params.test_grid,
                      resize=params.resize, mean=model.mean, std=model.std, reduced_decode=True,
                      test_flip=params.test_flip)


def check_normalisation(crop: CropConfig | dict, model: nn.Module, what: str) -> None:
    """The model's mean/std (its data config) are the one source: a crop config whose mean/std differ is a
    ConfigError, whatever its dtype (float32 crops would be normalised wrongly; a uint8 config that
    disagrees would do so the day someone switched it to float32)."""
    mean, std = (crop["mean"], crop["std"]) if isinstance(crop, dict) else (crop.mean, crop.std)
    for name, ours, theirs in (("mean", mean, model.mean), ("std", std, model.std)):
        if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(ours, theirs, strict=True)):
            raise ConfigError(f"{what}: crop {name} {tuple(ours)} differs from the model's {name} "
                              f"{tuple(theirs)}; build the crops with CropConfig.from_data_config(model.data_config) "
                              "or qfm.train.fit.crop_config")


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A model saved by `fit` (checksum-verified), rebuilt from its recorded config, in eval mode."""
    state = load_checkpoint(path)
    config = dict(state["model_config"])
    name = config.pop("name")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random init is overwritten by the saved weights at once
        model = create_model(name, **config, pretrained=False, allow_random_init=True)
    model.load_state_dict(state["model"])
    check_normalisation(state["crop"], model, f"checkpoint {path}")
    return model.to(device).to(memory_format=torch.channels_last).eval(), state


def check_selection(params: TrainParams) -> None:
    """params.select and params.average_epochs name a selection this loop can make."""
    if params.select not in SELECTIONS:
        raise ConfigError(f"select must be one of {list(SELECTIONS)}, got {params.select!r}")
    if params.select == "average" and not 1 <= params.average_epochs <= params.epochs:
        raise ConfigError(f"average_epochs must be between 1 and epochs ({params.epochs}) with select: average, "
                          f"got {params.average_epochs}")


def selection_rule(params: TrainParams) -> str:
    """How a run's saved model was chosen, in words (recorded beside its figures)."""
    if params.select == "last":
        return f"the last epoch ({params.epochs - 1}), fixed in advance"
    if params.select == "average":
        first = params.epochs - params.average_epochs
        return f"the mean weights of epochs {first}-{params.epochs - 1}, fixed in advance"
    return f"val {params.select_metric}"


def _add_weights(total: dict | None, model: nn.Module) -> dict:
    """The running sum of the model's float tensors (integer buffers such as BatchNorm's step count: the latest)."""
    state = model.state_dict()
    if total is None:
        return {k: v.detach().double().clone() if v.is_floating_point() else v.clone() for k, v in state.items()}
    for key, value in state.items():
        if value.is_floating_point():
            total[key] += value.detach().double()
        else:
            total[key] = value.clone()
    return total


def _mean_weights(total: dict, count: int, like: nn.Module) -> dict:
    state = like.state_dict()
    return {k: (v / count).to(state[k].dtype) if v.is_floating_point() else v for k, v in total.items()}


def _model_state(model: nn.Module, crop: CropConfig, epoch: int, val: dict, params: TrainParams,
                 val_split: dict) -> dict:
    return {"model": model.state_dict(), "model_config": dict(model.config), "crop": asdict(crop),
            "epoch": epoch, "val": val, "params": asdict(params), "val_split": val_split}


def validation_split(val_set: ManifestCropDataset) -> dict:
    """What best.safetensors records of the images the model was chosen on: the split's name and the digest
    of its validation image ids (qfm.data.splits.ids_digest), so that a later gate (qfm export --int8) can
    check that it judges on the same part."""
    return {"name": getattr(val_set, "split", None), "val_ids_sha256": ids_digest(val_set.image_ids)}


def validation_metrics(model: nn.Module, loader: DataLoader, mos: np.ndarray, device: torch.device,
                       amp: bool, progress: bool) -> tuple[dict, np.ndarray]:
    """Metrics on the validation part; {'error': why} when they cannot be computed (e.g. constant predictions).
    Under torchrun each rank predicts its share of the images and the predictions are gathered first."""
    index, pred, _ = predict(model, loader, device, amp=amp, progress=progress, desc="validate")
    index, pred = gather_rows(index, pred)
    try:
        return compute_metrics(pred, mos[index]), pred
    except DataError as exc:
        return {"error": str(exc)}, pred


def dataset_digest(dataset: ManifestCropDataset) -> str:
    """SHA-256 of what a dataset trains or validates on: image ids, scores and crop settings."""
    digest = hashlib.sha256(json.dumps([dataset.image_ids, asdict(dataset.config)], default=str).encode())
    digest.update(np.ascontiguousarray(dataset.mos, dtype=np.float32).tobytes())
    return digest.hexdigest()


def run_identity(params: TrainParams, train_set: ManifestCropDataset, val_set: ManifestCropDataset,
                 inputs: Mapping[str, str] | None = None) -> dict:
    """What a training run's result depends on: its parameters (not the execution-only ones), its data and
    any other inputs the caller names (e.g. the student's partner table); stored in every last.safetensors."""
    return {"params": {k: v for k, v in asdict(params).items() if k not in EXECUTION_ONLY},
            "data": {"train": dataset_digest(train_set), "val": dataset_digest(val_set), **dict(inputs or {})}}


def check_resumable(path: Path, recorded: dict | None, current: dict) -> None:
    """Refuse to resume a checkpoint made with other parameters or other data, naming what differs."""
    if recorded is None:
        raise ConfigError(f"cannot resume {path}: it records no parameters or data (written by an older qfm), so "
                          "it may belong to another run; delete it (or use another output folder) to start over")
    changes = [f"{key}: {recorded['params'].get(key, '(unset)')!r} in the checkpoint, {value!r} now"
               for key, value in current["params"].items() if recorded["params"].get(key, "(unset)") != value]
    described = {"train": "the training images, scores or crop settings differ",
                 "val": "the validation images, scores or crop settings differ"}
    keys = sorted(set(current["data"]) | set(recorded["data"]))
    changes += [described.get(key, f"the {key} differ") for key in keys
                if current["data"].get(key) != recorded["data"].get(key)]
    if changes:
        raise ConfigError(f"cannot resume {path}: it was made with other parameters or data ("
                          + "; ".join(changes) + "). Use another output folder, delete the checkpoint to start "
                          "over, or resume with the parameters it was made with")


def fit(model: nn.Module, train_set: ManifestCropDataset, val_set: ManifestCropDataset, step_fn: StepFn,
        params: TrainParams, out_dir: str | Path, *, device: str | torch.device = "auto", resume: bool = False,
        progress: bool = True, batch_sampler=None, on_epoch=None,
        inputs: Mapping[str, str] | None = None) -> FitResult:
    """Train, validate each epoch, keep the best model by params.select_metric on the validation part.

    The best epoch is the one whose validation metric is best in the metric's own direction (RMSE: lowest);
    an epoch whose metric could not be computed is never chosen. `inputs` names other inputs the result
    depends on (digests); `resume` continues OUT/last.safetensors only if it was made with the same parameters,
    data and inputs. Under torchrun (qfm.train.distributed) params.batch_size is the global batch, each rank
    trains on its share under DDP, validation is gathered from every rank, and only rank 0 writes."""
    started = time.perf_counter()
    check_metric(params.select_metric, "select_metric")
    check_selection(params)
    out_dir = Path(out_dir)
    here = ranks()
    if here.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    check_normalisation(train_set.config, model, "the training dataset")
    check_normalisation(val_set.config, model, "the validation dataset")
    device = resolve_device(device)
    seed_everything(params.seed)
    model.to(device).to(memory_format=torch.channels_last)  # faster convolutions on GPU and CPU alike
    if batch_sampler is None:  # order from (seed, epoch) only, so a resumed run sees the same batches
        batch_sampler = ShuffledBatches(len(train_set), params.batch_size, params.seed)
    rank_batch = per_rank_batch(params.batch_size, "batch_size")
    if here.world > 1:  # each rank trains on its share of the same global batches
        batch_sampler = RankBatches(batch_sampler, here.rank, here.world, getattr(batch_sampler, "partners", None))
    workers = loader_workers(params.workers, device, name="workers")
    train_loader = make_loader(train_set, workers=workers, batch_sampler=batch_sampler)
    val_loader = sharded_loader(val_set, rank_batch, workers)
    steps_per_epoch = len(train_loader)
    optimizer = make_optimizer(model, params.lr, params.weight_decay)
    scheduler = make_scheduler(optimizer, params.epochs * steps_per_epoch,
                               round(params.warmup_epochs * steps_per_epoch), params.schedule,
                               step_every=max(1, steps_per_epoch * max(1, params.epochs // 3)))
    history: list[dict] = []
    best = {"epoch": -1, "value": None, "val": {}}
    start_epoch = 0
    averaged: dict | None = None  # select: average: the running sum of the averaged epochs' weights
    last_path = out_dir / LAST
    identity = run_identity(params, train_set, val_set, inputs)
    if resume and from_main(last_path.exists()):  # every rank resumes from rank 0's checkpoint
        data = broadcast_bytes(read_checkpoint_bytes(last_path) if here.main else None, device)
        state = decode_checkpoint(data, last_path)
        check_resumable(last_path, state.get("identity"), identity)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        averaged = state.get("averaged")
    step = data_parallel_step(model, step_fn, device)
    val_mos = val_set.mos
    for epoch in range(start_epoch, params.epochs):
        epoch_started = time.perf_counter()
        train_set.set_epoch(epoch)
        batch_sampler.set_epoch(epoch)
        train_log = train_one_epoch(model, train_loader, step, optimizer, scheduler, device, epoch=epoch,
                                    clip_grad=params.clip_grad, amp=params.amp, progress=progress and here.main,
                                    on_step=_pause_after_step)
        sync_buffers(model)
        train_log = combine_logs(train_log, COUNT_PREFIX)
        val, _ = validation_metrics(model, val_loader, val_mos, device, params.amp, progress and here.main)
        value = val.get(params.select_metric)
        val_log = {f"val_{k}": v for k, v in val.items() if _is_number(v) or k == "error"}
        record = {"epoch": epoch, **train_log, **val_log, "lr": scheduler.get_last_lr()[0],
                  "seconds": time.perf_counter() - epoch_started}
        history.append(record)
        chosen = model
        if params.select == "best":
            improved = _is_finite(value) and (best["value"] is None
                                              or gain(params.select_metric, value, best["value"]) > 0)
        else:
            improved = epoch == params.epochs - 1
            if params.select == "average" and epoch >= params.epochs - params.average_epochs:
                averaged = _add_weights(averaged, model)
            if improved and params.select == "average":
                chosen = copy.deepcopy(model)
                chosen.load_state_dict(_mean_weights(averaged, params.average_epochs, model))
                val, _ = validation_metrics(chosen, val_loader, val_mos, device, params.amp, progress and here.main)
                value = val.get(params.select_metric)
                record["averaged_val"] = {k: v for k, v in val.items() if _is_number(v) or k == "error"}
            improved = improved and _is_finite(value)
        if improved:
            best = {"epoch": epoch, "value": value, "val": val}
        if not here.main:  # only rank 0 writes; every rank holds the same model, history and choice
            continue
        if improved:
            save_checkpoint(_model_state(chosen, train_set.config, epoch, val, params, validation_split(val_set)),
                            out_dir / BEST)
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rng_state(), "epoch": epoch,
                         "history": history, "best": best, "identity": identity,
                         **({"averaged": averaged} if averaged is not None else {})}, last_path)
        (out_dir / HISTORY).write_text(json.dumps(history, indent=2) + "\n")
        if on_epoch is not None:
            on_epoch(record)
    if best["epoch"] < 0:
        raise DataError(f"no epoch of {out_dir} could be scored on the validation part by {params.select_metric} "
                        f"(last epoch: {history[-1].get('val_error', 'no value') if history else 'none run'}); "
                        "choose another select_metric (srcc is always defined for varied predictions) or check "
                        "the validation part")
    return FitResult(best_epoch=best["epoch"], best_val=best["val"], history=history, model_path=out_dir / BEST,
                     seconds=time.perf_counter() - started, selected_on=selection_rule(params))


def _pause_after_step(global_step: int) -> None:
    pause_point(f"step:{global_step}")  # lets a fault test SIGKILL training mid-epoch (qfm/faults.py)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)
