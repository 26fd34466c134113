"""build-bank (SNM): embeddings of every training image (labelled train part + kept pseudo-labels; never a
val or test image), a faiss index and the noise-partner pair table.

The descriptor (build_bank.descriptor) is the L2-normalised global feature of either the fine-tuned
teacher's encoder ('teacher'), whose features already encode quality, or the same pretrained encoder
before fine-tuning ('backbone'): ImageNet features, the semantic ones the paper matches on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from qfm.config import BankParams, RunParams
from qfm.data.torch_dataset import CropConfig, ManifestCropDataset
from qfm.errors import ConfigError
from qfm.models import create_model
from qfm.runtime import loader_workers
from qfm.snm.bank import index_and_mine
from qfm.steps.common import TRAIN_COLUMN, manifest_for_split, setup, training_manifest, write_json
from qfm.steps.pseudo_label import read_pseudo_labels
from qfm.tracking import tracked
from qfm.train.checkpoint import model_path
from qfm.train.distributed import from_main, gather_rows, is_main, sharded_loader
from qfm.train.engine import embed
from qfm.train.fit import load_trained_model

DESCRIPTORS = ("teacher", "backbone")


def pretrained_encoder(teacher_params: dict, device) -> nn.Module:
    """The model the teacher was fine-tuned from, with the same pretrained weights, in eval mode."""
    model = create_model(teacher_params["model"], **teacher_params.get("model_options", {}))
    return model.to(device).to(memory_format=torch.channels_last).eval()


@tracked("build_bank", inputs=("manifest_dir", "teacher_dir", "pseudo_dir"), outputs=("summary.json",))
def build_bank(manifest_dir: str | Path, teacher_dir: str | Path, pseudo_dir: str | Path | None,
               out_dir: str | Path, params: BankParams, run: RunParams, *, progress: bool = True) -> dict:
    """Embed, index, mine; writes index.faiss, embeddings.npy, bank.parquet, pairs.parquet, summary.json."""
    manifest = manifest_for_split(manifest_dir, run.split)
    pseudo = read_pseudo_labels(pseudo_dir if params.include_pseudo else None)
    table = training_manifest(manifest, run.split, pseudo)
    if params.descriptor not in DESCRIPTORS:
        raise ConfigError(f"build_bank.descriptor '{params.descriptor}' is not one of {DESCRIPTORS}")
    device = setup(run)
    encoder, state = load_trained_model(model_path(teacher_dir), device)
    if params.descriptor == "backbone":
        encoder = pretrained_encoder(state["params"], device)
    dataset = ManifestCropDataset(table, TRAIN_COLUMN, "train", CropConfig(**state["crop"]), train=False)
    loader = sharded_loader(dataset, params.batch_size, loader_workers(params.workers, device))
    index, embeddings = gather_rows(*embed(encoder, loader, device, progress=progress and is_main()))
    if not is_main():  # under torchrun each rank embedded its share; rank 0 indexes, mines and writes
        return from_main(None)
    frame = table.frame.iloc[dataset.row_positions[index]]
    meta = pd.DataFrame({"image_id": frame["image_id"].astype(str).to_numpy(),
                         "content_id": frame["content_id"].astype(str).to_numpy(),
                         "quality": frame["mos"].astype(float).to_numpy(),
                         "is_pseudo": frame["is_pseudo"].astype(bool).to_numpy()})
    summary = index_and_mine(out_dir, embeddings, meta, rule=params.rule, k=params.k, tau=params.tau,
                             delta=params.delta, max_partners=params.max_partners,
                             index_options={"kind": params.index, "ann_threshold": params.ann_threshold})
    summary |= {"split": run.split, "descriptor": params.descriptor, "n_labelled": int((~meta["is_pseudo"]).sum()),
                "n_pseudo": int(meta["is_pseudo"].sum())}
    write_json(Path(out_dir) / "summary.json", summary)
    return from_main(summary)
