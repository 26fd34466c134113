"""evaluate: deterministic multi-crop test of a trained model on one part of a split (test by default)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qfm.config import RunParams
from qfm.data.torch_dataset import CropConfig, ManifestCropDataset, make_loader
from qfm.eval.metrics import compute_metrics
from qfm.eval.report import scatter_plot, write_metrics_json
from qfm.runtime import loader_workers
from qfm.steps.common import manifest_for_split, setup
from qfm.tracking import tracked
from qfm.train.checkpoint import model_path
from qfm.train.engine import predict
from qfm.train.fit import load_trained_model


@tracked("evaluate", inputs=("manifest_dir", "model_dir"), params=("run", "part"),
         outputs=("metrics.json", "predictions.csv", "scatter.png"))
def evaluate(manifest_dir: str | Path, model_dir: str | Path, out_dir: str | Path, run: RunParams, *,
             part: str = "test", batch_size: int = 16, workers: int | str = "auto", progress: bool = True) -> dict:
    """Writes metrics.json (SRCC, KRCC, PLCC raw and logistic-fitted, RMSE), predictions.csv, scatter.png."""
    manifest = manifest_for_split(manifest_dir, run.split)
    device = setup(run)
    model, state = load_trained_model(model_path(model_dir), device)
    dataset = ManifestCropDataset(manifest, run.split, part, CropConfig(**state["crop"]), train=False)
    loader = make_loader(dataset, batch_size, loader_workers(workers, device))
    index, pred, spread = predict(model, loader, device, progress=progress, desc=f"evaluate {part}")
    mos = dataset.mos[index]
    metrics = compute_metrics(pred, mos)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": [dataset.image_ids[i] for i in index], "mos": mos, "prediction": pred,
                  "crop_std": spread}).to_csv(out_dir / "predictions.csv", index=False)
    extra = {"split": run.split, "part": part, "model_epoch": state["epoch"],
             "model_selected_on": "validation part", "plcc_raw": "Pearson on raw predictions",
             "plcc_logistic": "Pearson after the 4-parameter logistic fit", "n_test_crops": dataset.crops_per_item}
    write_metrics_json(out_dir / "metrics.json", metrics, extra)
    scatter_plot(out_dir / "scatter.png", pred, mos, metrics, title=f"{manifest.meta.get('dataset', '')} "
                 f"{run.split} {part}")
    return metrics
