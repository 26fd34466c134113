"""train-student (QCC): the deployed model, trained on the labelled train part plus kept pseudo-labels,
with each anchor perturbed by its SNM partner's tokens (T' = T + alpha * N) and kept consistent."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from qfm.config import RunParams, StudentParams
from qfm.data.torch_dataset import ManifestCropDataset
from qfm.errors import DataError
from qfm.eval.report import training_curves_plot
from qfm.losses import LossWeights
from qfm.runtime import loader_workers
from qfm.snm.bank import load_pairs
from qfm.steps.common import TRAIN_COLUMN, manifest_for_split, setup, training_manifest, write_json
from qfm.steps.pseudo_label import read_pseudo_labels
from qfm.tracking import TRAINING_OUTPUTS, tracked
from qfm.train.checkpoint import model_path
from qfm.train.distributed import gather_rows, is_main, sharded_loader
from qfm.train.engine import predict
from qfm.train.fit import build_model, crop_config, fit, load_trained_model
from qfm.train.sampler import PairBatches, ShuffledBatches
from qfm.train.steps import QccStep

PAIRS_FILE = "pairs.parquet"


def partner_indices(pairs, image_ids: list[str]) -> dict[int, list[int]]:
    """The pair table (anchor_id, partner_id, rank) as dataset positions; pairs outside the set are dropped."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    out: dict[int, list[int]] = {}
    for anchor, partner in pairs.sort_values(["anchor_id", "rank"])[["anchor_id", "partner_id"]].itertuples(
            index=False):
        a, p = position.get(str(anchor)), position.get(str(partner))
        if a is not None and p is not None:
            out.setdefault(a, []).append(p)
    return out


def load_partners(bank_dir: str | Path | None, params: StudentParams,
                  image_ids: list[str]) -> tuple[dict[int, list[int]], str]:
    """Partners for QCC and the rule that mined them; an empty or missing table is an error unless
    allow_empty_pairs says to go on."""
    if not uses_qcc(params):
        return {}, "aliasing"
    try:
        if bank_dir is None:
            raise DataError("train_student.qcc is on but no bank folder was given (run `qfm build-bank`)")
        pairs = load_pairs(Path(bank_dir) / PAIRS_FILE)
        partners = partner_indices(pairs, image_ids)
        if not partners:
            raise DataError(f"no pair of {Path(bank_dir) / PAIRS_FILE} joins two images of this training set")
    except DataError as exc:
        if not params.allow_empty_pairs:
            raise DataError(f"{exc}. QCC needs noise partners: loosen build_bank.tau/delta or raise k, or set "
                            "train_student.allow_empty_pairs: true to train without QCC") from exc
        warnings.warn(f"training the student without QCC: {exc}", stacklevel=2)
        return {}, "aliasing"
    return partners, str(pairs["rule"].iloc[0])


def uses_qcc(params: StudentParams) -> bool:
    """QCC (and the contrastive term on its partners) is on and weighted."""
    return params.qcc and (params.lambda_qcc > 0 or params.lambda_con > 0)


def uses_pseudo_labels(params: StudentParams) -> bool:
    """DLE reaches the student only when asked for and weighted: lambda_pl 0 leaves pseudo-labels out."""
    return params.use_pseudo_labels and params.lambda_pl > 0


@tracked("train_student", inputs=("manifest_dir", "teacher_dir", "pseudo_dir", "bank_dir"), outputs=TRAINING_OUTPUTS,
         checkpoints=("best.safetensors",))
def train_student(manifest_dir: str | Path, out_dir: str | Path, params: StudentParams, run: RunParams, *,
                  teacher_dir: str | Path | None = None, pseudo_dir: str | Path | None = None,
                  bank_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
                  on_epoch=None) -> dict:
    """Train the student; writes best.safetensors, last.safetensors, history.json, training_curves.png, summary.json."""
    device = setup(run)
    manifest = manifest_for_split(manifest_dir, run.split)
    pseudo = read_pseudo_labels(pseudo_dir if uses_pseudo_labels(params) else None)
    table = training_manifest(manifest, run.split, pseudo)
    model = build_model(params)
    crops = crop_config(params, model)
    train_set = ManifestCropDataset(table, TRAIN_COLUMN, "train", crops, train=True, seed=params.seed)
    val_set = ManifestCropDataset(manifest, run.split, "val", crops, train=False)
    is_pseudo = table.frame["is_pseudo"].to_numpy(dtype=bool)[train_set.row_positions]
    partners, rule = load_partners(bank_dir, params, train_set.image_ids)
    teacher_scores = None
    if params.lambda_kd > 0:
        teacher_scores = _teacher_scores(teacher_dir, table, crops, device, params)
    weights = LossWeights(lambda_qcc=params.lambda_qcc, lambda_con=params.lambda_con, lambda_pl=params.lambda_pl,
                          lambda_kd=params.lambda_kd)
    step = QccStep(partners, is_pseudo, weights, qcc=bool(partners), alpha=params.alpha, mode=params.qcc_mode,
                   temperature=params.temperature, positive_gap=params.positive_gap, rule=rule,
                   teacher_scores=teacher_scores)
    sampler = (PairBatches(len(train_set), params.batch_size, partners, params.seed, resample=params.resample_partners)
               if partners else ShuffledBatches(len(train_set), params.batch_size, params.seed))
    inputs = {"partners": _digest(sorted((a, list(p)) for a, p in partners.items())) + rule,
              "teacher_scores": _digest(None if teacher_scores is None else teacher_scores.tolist())}
    result = fit(model, train_set, val_set, step, params, out_dir, device=device, resume=resume,
                 progress=progress, batch_sampler=sampler, on_epoch=on_epoch, inputs=inputs)
    out_dir = Path(out_dir)
    pairs_trained = [int(r.get("n_qcc_pairs", 0)) for r in result.history]
    summary = {"split": run.split, "model": params.model, "weights": model.weights_source,
               "best_epoch": result.best_epoch, "selected_on": result.selected_on, "val": result.best_val,
               "n_labelled": int((~is_pseudo).sum()), "n_pseudo": int(is_pseudo.sum()),
               "qcc": bool(partners), "rule": rule if partners else None,
               "n_anchors_with_partners": len(partners), "qcc_pairs_per_epoch": pairs_trained,
               "seconds": round(result.seconds, 1)}
    if is_main():  # under torchrun rank 0 writes; the other ranks return the same summary
        training_curves_plot(out_dir / "training_curves.png", result.history)
        write_json(out_dir / "summary.json", summary)
    return summary


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def _teacher_scores(teacher_dir, table, crops, device, params: StudentParams) -> np.ndarray:
    """The frozen teacher's multi-crop score of every training image (for the distillation term)."""
    if teacher_dir is None:
        raise DataError("train_student.lambda_kd > 0 needs the teacher: pass the teacher's folder")
    teacher, _ = load_trained_model(model_path(teacher_dir), device)
    images = ManifestCropDataset(table, TRAIN_COLUMN, "train", crops, train=False)
    loader = sharded_loader(images, params.batch_size, loader_workers(params.workers, device))
    index, score = gather_rows(*predict(teacher, loader, device, progress=False, desc="teacher scores")[:2])
    out = np.zeros(len(images), dtype=np.float32)
    out[index] = score
    return out
