"""build-bank (SNM): frozen-teacher embeddings of every training image (labelled train part + kept
pseudo-labels; never a val or test image), a faiss index and the noise-partner pair table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qfm.config import BankParams, RunParams
from qfm.data.torch_dataset import CropConfig, ManifestCropDataset, make_loader
from qfm.snm.bank import build_bank as index_and_mine
from qfm.steps.common import TRAIN_COLUMN, manifest_for_split, model_path, training_manifest, write_json
from qfm.steps.pseudo_label import read_pseudo_labels
from qfm.tracking import tracked
from qfm.train.engine import embed, resolve_device
from qfm.train.fit import load_trained_model


@tracked("build_bank", inputs=("manifest_dir", "teacher_dir", "pseudo_dir"), outputs=("summary.json",))
def build_bank(manifest_dir: str | Path, teacher_dir: str | Path, pseudo_dir: str | Path | None,
               out_dir: str | Path, params: BankParams, run: RunParams, *, progress: bool = True) -> dict:
    """Embed, index, mine; writes index.faiss, embeddings.npy, bank.parquet, pairs.parquet, summary.json."""
    manifest = manifest_for_split(manifest_dir, run.split)
    pseudo = read_pseudo_labels(pseudo_dir if params.include_pseudo else None)
    table = training_manifest(manifest, run.split, pseudo)
    device = resolve_device(run.device)
    teacher, state = load_trained_model(model_path(teacher_dir), device)
    dataset = ManifestCropDataset(table, TRAIN_COLUMN, "train", CropConfig(**state["crop"]), train=False)
    index, embeddings = embed(teacher, make_loader(dataset, params.batch_size, params.workers), device,
                              progress=progress)
    frame = table.frame.iloc[dataset.row_positions[index]]
    meta = pd.DataFrame({"image_id": frame["image_id"].astype(str).to_numpy(),
                         "content_id": frame["content_id"].astype(str).to_numpy(),
                         "quality": frame["mos"].astype(float).to_numpy(),
                         "is_pseudo": frame["is_pseudo"].astype(bool).to_numpy()})
    summary = index_and_mine(out_dir, embeddings, meta, rule=params.rule, k=params.k, tau=params.tau,
                             delta=params.delta, max_partners=params.max_partners,
                             index_options={"kind": params.index, "ann_threshold": params.ann_threshold})
    summary |= {"split": run.split, "n_labelled": int((~meta["is_pseudo"]).sum()),
                "n_pseudo": int(meta["is_pseudo"].sum())}
    write_json(Path(out_dir) / "summary.json", summary)
    return summary
