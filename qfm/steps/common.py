"""Small helpers the step functions share: a step's start, reading inputs, writing summaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qfm.data.manifest import Manifest, read_manifest
from qfm.data.splits import part_mask
from qfm.errors import DataError

if TYPE_CHECKING:
    import torch

TRAIN_COLUMN = "_train"


def manifest_for_split(manifest_dir: str | Path, split: str) -> Manifest:
    """The manifest, after checking that the split column exists (a clear error naming it otherwise)."""
    manifest = read_manifest(manifest_dir)
    part_mask(manifest.frame, split, "train")
    return manifest


def setup(run) -> torch.device:
    """A step's start: its device (run.device) and torch's threads (run.threads) for this process; under
    torchrun, the rank's process group and its own GPU (qfm.train.distributed.join)."""
    from qfm.runtime import resolve_device, set_threads
    from qfm.train.distributed import join

    set_threads(run.threads)
    return join(resolve_device(run.device))


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def training_manifest(manifest: Manifest, split: str, pseudo: pd.DataFrame) -> Manifest:
    """The student's (and the bank's) training set: the labelled train part of the split plus the kept
    pseudo-labelled pool images, as one manifest whose column TRAIN_COLUMN is 'train' for every row."""
    labelled = manifest.frame.loc[manifest.frame[split] == "train", ["image_id", "path", "mos", "content_id"]]
    labelled = labelled.assign(is_pseudo=False)
    extra = pd.DataFrame({"image_id": pseudo["image_id"].astype(str), "path": pseudo["path"].astype(str),
                          "mos": pseudo["score"].astype(float), "content_id": pseudo["content_id"].astype(str),
                          "is_pseudo": True})
    frame = pd.concat([labelled, extra], ignore_index=True)
    clash = frame["image_id"].duplicated()
    if clash.any():
        raise DataError(f"pseudo-labelled pool images share ids with labelled ones: "
                        f"{frame.loc[clash, 'image_id'].head(5).tolist()}; give the pool its own folder")
    frame[TRAIN_COLUMN] = "train"
    return Manifest(frame=frame, root=manifest.root, meta=manifest.meta)
