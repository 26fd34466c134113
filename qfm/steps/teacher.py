"""train-teacher: the plain DEIQT recipe on the labelled train part; model selection on the val part."""

from __future__ import annotations

from pathlib import Path

from qfm.config import RunParams, TrainParams
from qfm.data.torch_dataset import ManifestCropDataset
from qfm.eval.report import training_curves_plot
from qfm.steps.common import manifest_for_split, setup, write_json
from qfm.tracking import TRAINING_OUTPUTS, tracked
from qfm.train.distributed import is_main
from qfm.train.fit import build_model, crop_config, fit
from qfm.train.steps import plain_step


@tracked("train_teacher", inputs=("manifest_dir",), outputs=TRAINING_OUTPUTS, checkpoints=("best.safetensors",))
def train_teacher(manifest_dir: str | Path, out_dir: str | Path, params: TrainParams, run: RunParams, *,
                  resume: bool = False, progress: bool = True, on_epoch=None) -> dict:
    """Train on split `run.split`'s train part; writes best.safetensors, last.safetensors, history.json, summary.json."""
    manifest = manifest_for_split(manifest_dir, run.split)
    model = build_model(params)
    crops = crop_config(params, model)
    train_set = ManifestCropDataset(manifest, run.split, "train", crops, train=True, seed=params.seed)
    val_set = ManifestCropDataset(manifest, run.split, "val", crops, train=False)
    result = fit(model, train_set, val_set, plain_step, params, out_dir, device=setup(run), resume=resume,
                 progress=progress, on_epoch=on_epoch)
    out_dir = Path(out_dir)
    summary = {"split": run.split, "model": params.model, "weights": model.weights_source,
               "best_epoch": result.best_epoch, "selected_on": result.selected_on,
               "val": result.best_val, "n_train": len(train_set), "n_val": len(val_set),
               "seconds": round(result.seconds, 1)}
    if is_main():  # under torchrun rank 0 writes; the other ranks return the same summary
        training_curves_plot(out_dir / "training_curves.png", result.history)
        write_json(out_dir / "summary.json", summary)
    return summary
