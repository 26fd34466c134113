"""Small helpers the step functions share: reading inputs, writing summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qfm.data.manifest import Manifest, read_manifest
from qfm.data.splits import part_mask
from qfm.errors import DataError
from qfm.train.checkpoint import BEST, LEGACY_SUFFIX, legacy_message

MODEL_FILE = BEST
TRAIN_COLUMN = "_train"


def manifest_for_split(manifest_dir: str | Path, split: str) -> Manifest:
    """The manifest, after checking that the split column exists (a clear error naming it otherwise)."""
    manifest = read_manifest(manifest_dir)
    part_mask(manifest.frame, split, "train")
    return manifest


def model_path(model_ref: str | Path) -> Path:
    """A trained model's checkpoint: the file given, or the selected model of a training step's output
    folder; a DataError naming what is missing, or how to convert the pickled best.pt of an earlier qfm."""
    ref = Path(model_ref)
    if ref.is_file():
        return ref
    if not ref.exists():
        raise DataError(f"no trained model at {ref}: it does not exist; pass a trained model folder (holding "
                        f"{MODEL_FILE}) or the checkpoint file")
    path = ref / MODEL_FILE
    if not path.is_file():
        legacy = path.with_suffix(LEGACY_SUFFIX)
        if legacy.is_file():
            raise DataError(legacy_message(legacy))
        raise DataError(f"no trained model at {path}: run the training step that writes {ref} first")
    return path


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
