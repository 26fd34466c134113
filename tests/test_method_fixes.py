"""What silently weakened QFM-IQM, each pinned by a test: lambda_pl 0, the direction of the selection metric,
DLE leakage of val/test images, relative pseudo-label paths, QCC bookkeeping and pairing, and semantic
partners in the contrastive term."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TRAINING
from PIL import Image
from torch import nn

import qfm.train.steps as steps_module
from qfm.config import PseudoLabelParams, RunParams, StudentParams, TrainParams
from qfm.data.manifest import read_manifest
from qfm.data.torch_dataset import ManifestCropDataset
from qfm.errors import ConfigError
from qfm.eval.metrics import gain
from qfm.losses import LossWeights
from qfm.registry.gate import decide
from qfm.steps.pseudo_label import pseudo_label, read_pseudo_labels
from qfm.steps.student import train_student
from qfm.train.engine import train_one_epoch
from qfm.train.fit import build_model, crop_config, fit
from qfm.train.steps import QccStep, plain_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = TINY_TRAINING
RUN = RunParams(split="split_0", device="cpu")


@pytest.fixture(scope="module")
def teacher(tiny_teacher) -> Path:
    """The session's teacher (TINY on split_0, as RUN asks), shared with test_training."""
    return tiny_teacher[0]


def _batch(n_images: int, crops: int, pseudo: list[int] = ()) -> dict:
    """A batch whose crop k of image i is filled with 10 * i + k (so every crop row is recognisable)."""
    values = [10 * i + k for i in range(n_images) for k in range(crops)]
    images = torch.tensor(values, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 4, 4).contiguous()
    return {"image": images, "mos": torch.linspace(0.1, 0.9, n_images), "index": torch.arange(n_images),
            "n_crops": torch.full((n_images,), crops)}


class RecordingModel(nn.Module):
    """encode: one token row per crop from its pixel value; decode: the sum of its tokens. Records both."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.decoded: list[torch.Tensor] = []

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        value = x.float().mean(dim=(1, 2, 3))
        self.tokens = torch.stack([value, 2 * value], dim=1)[:, :, None].repeat(1, 1, 4) * self.scale
        return self.tokens

    def decode(self, tokens: torch.Tensor, return_features: bool = False):
        self.decoded.append(tokens)
        pred = tokens.sum(dim=(1, 2)) / 1000
        return (pred, tokens.mean(dim=1)) if return_features else pred


def test_lambda_pl_zero_switches_pseudo_labels_off(tiny_demo, teacher, tmp_path):
    pseudo_label(tiny_demo, teacher, tmp_path / "pseudo", PseudoLabelParams(workers=0), RUN, progress=False)
    summary = train_student(tiny_demo, tmp_path / "s", StudentParams(**TINY, qcc=False, lambda_pl=0.0), RUN,
                            pseudo_dir=tmp_path / "pseudo", progress=False)
    assert summary["n_pseudo"] == 0
    with_pl = train_student(tiny_demo, tmp_path / "s2", StudentParams(**TINY, qcc=False, lambda_pl=0.5), RUN,
                            pseudo_dir=tmp_path / "pseudo", progress=False)
    assert with_pl["n_pseudo"] > 0
    # a step that is handed a batch of pseudo-labelled images with lambda_pl 0 refuses instead of training them
    # at weight 1 as quality loss (the old fallback)
    step = QccStep({}, np.ones(3, dtype=bool), LossWeights(lambda_pl=0.0), qcc=False)
    with pytest.raises(ConfigError, match="lambda_pl is 0"):
        step(RecordingModel(), _batch(3, 1), torch.device("cpu"))
    loss, log = QccStep({}, np.ones(3, dtype=bool), LossWeights(lambda_pl=0.5), qcc=False)(
        RecordingModel(), _batch(3, 1), torch.device("cpu"))
    assert "loss_quality" not in log and loss.item() == pytest.approx(0.5 * log["loss_pseudo"])


def _fit(tiny_demo, out, select_metric: str):
    params = TrainParams(**(TINY | {"epochs": 3, "select_metric": select_metric, "lr": 2e-3}))
    manifest = read_manifest(tiny_demo)
    model = build_model(params)
    crops = crop_config(params, model)
    train = ManifestCropDataset(manifest, "split_0", "train", crops, train=True)
    val = ManifestCropDataset(manifest, "split_0", "val", crops)
    return fit(model, train, val, plain_step, params, out, device="cpu", progress=False)


def test_model_selection_follows_the_metric_direction(tiny_demo, tmp_path):
    result = _fit(tiny_demo, tmp_path / "rmse", "rmse_raw")
    rmse = [h["val_rmse_raw"] for h in result.history]
    assert len(set(rmse)) == 3
    assert result.best_epoch == int(np.argmin(rmse)) and result.best_val["rmse_raw"] == min(rmse)
    with pytest.raises(ConfigError, match="select_metric 'accuracy' is not a metric"):
        _fit(tiny_demo, tmp_path / "bad", "accuracy")
    assert gain("rmse_raw", 0.1, 0.2) == pytest.approx(0.1) and gain("srcc", 0.1, 0.2) == pytest.approx(-0.1)
    assert gain("plcc_logistic", None, 0.5) is None and gain("srcc", float("nan"), 0.5) is None
    refused = decide("plcc_logistic", 0.01, None, 0.8, "3")
    assert not refused.promote and "could not be computed" in refused.reason
    assert decide("rmse_raw", 0.01, 0.10, 0.20, "3").promote and not decide("rmse_raw", 0.01, 0.20, 0.10, "3").promote


def test_dle_never_pseudo_labels_a_val_or_test_image(tiny_demo, teacher, tmp_path):
    manifest = read_manifest(tiny_demo)
    frame = manifest.frame
    pool = manifest.root / "leaky_pool"
    pool.mkdir(exist_ok=True)
    for n, path in enumerate(frame["path"]):  # every dataset image under a new name: same bytes, other path
        shutil.copy(manifest.image_path(path), pool / f"copy_{n}.png")
    fresh = np.asarray(Image.open(manifest.image_path(frame["path"].iloc[0])).convert("RGB"))[::-1]
    Image.fromarray(np.ascontiguousarray(fresh)).save(pool / "new_image.png")  # a genuinely new image
    try:
        summary = pseudo_label(tiny_demo, teacher, tmp_path / "copies", PseudoLabelParams(pool="leaky_pool", workers=0),
                               RUN, progress=False)
        images_dir = str(Path(frame["path"].iloc[0]).parent)  # the dataset's own image folder as a pool
        with pytest.warns(UserWarning, match="was left out"):
            own = pseudo_label(tiny_demo, teacher, tmp_path / "own", PseudoLabelParams(pool=images_dir, workers=0),
                               RUN, progress=False)
    finally:
        shutil.rmtree(pool)
    held = int((frame["split_0"] != "train").sum())
    assert summary["n_excluded"]["heldout_bytes"] == held
    assert summary["n_excluded"]["labelled_train_image"] == len(frame) - held
    table = pd.read_parquet(tmp_path / "copies" / "pseudo_labels.parquet")
    assert table["path"].tolist() == ["leaky_pool/new_image.png"]
    assert own["n_excluded"]["heldout_file"] + own["n_excluded"]["heldout_content"] == held
    assert own["n_pool"] == 0


def test_synthetic_pool_paths_are_relative_and_survive_a_move(tiny_demo, teacher, tmp_path, monkeypatch):
    pseudo_label(tiny_demo, teacher, tmp_path / "p", PseudoLabelParams(pool="synthetic", workers=0), RUN,
                 progress=False)
    table = pd.read_parquet(tmp_path / "p" / "pseudo_labels.parquet")
    assert set(table["path_root"]) == {"pseudo"} and not any(Path(p).is_absolute() for p in table["path"])
    shutil.move(tmp_path / "p", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)  # a relative folder, as dvc.yaml gives it
    kept = read_pseudo_labels(Path("moved"))
    assert len(kept) > 0 and all(Path(p).is_file() and Path(p).is_absolute() for p in kept["path"])
    assert all(Path(p).is_relative_to(tmp_path / "moved") for p in kept["path"])


def test_epoch_log_averages_qcc_loss_over_the_steps_that_had_pairs():
    model = nn.Linear(1, 1)
    logs = [{"loss": 1.0, "loss_qcc": 0.4, "n_qcc_pairs": 2.0}, {"loss": 2.0, "n_qcc_pairs": 0.0},
            {"loss": 3.0, "loss_qcc": 0.2, "n_qcc_pairs": 3.0}]
    it = iter(logs)

    def step(model_, batch, device):
        return model_(torch.ones(1, 1)).sum() * 0 + 1.0, next(it)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    out = train_one_epoch(model, [{}] * 3, step, optimizer, scheduler, torch.device("cpu"), epoch=0, progress=False)
    assert out["loss"] == pytest.approx(2.0) and out["loss_qcc"] == pytest.approx(0.3)
    assert out["n_qcc_pairs"] == 5 and out["steps"] == 3


def test_qcc_step_pairs_crop_k_with_crop_k_and_no_gradient_reaches_the_partner():
    model = RecordingModel()
    step = QccStep({0: [1]}, np.zeros(3, dtype=bool), LossWeights(lambda_qcc=1.0), alpha=0.5)
    _, log = step(model, _batch(3, crops=3), torch.device("cpu"))
    assert log["n_qcc_pairs"] == 1 and "loss_qcc" in log
    _, perturbed = model.decoded
    tokens = model.tokens
    assert perturbed.shape[0] == 3  # the anchor's three crops
    # crop k of the anchor (rows 0..2) meets crop k of its partner (rows 3..5)
    assert torch.allclose(perturbed, tokens[0:3] + 0.5 * tokens[3:6])
    k = torch.arange(3.0)
    assert torch.allclose(perturbed[:, 0, 0], k + 0.5 * (10 + k))  # pixel values 10 * image + crop
    grad, = torch.autograd.grad(perturbed.sum(), tokens, retain_graph=True)
    assert torch.all(grad[3:6] == 0) and torch.all(grad[0:3] == 1) and torch.all(grad[6:] == 0)


def test_semantic_partners_are_positives_of_the_contrastive_term_not_negatives(monkeypatch):
    seen = {}

    def capture(features, quality, negative_mask, temperature=0.1, positive_gap=0.05, positive_mask=None):
        seen.update(negatives=negative_mask.clone(), positives=positive_mask, gap=positive_gap)
        return features.sum() * 0

    monkeypatch.setattr(steps_module, "quality_contrastive_loss", capture)
    batch = _batch(3, crops=1)  # qualities 0.1, 0.5, 0.9; image 0's partner is image 1
    weights = LossWeights(lambda_qcc=1.0, lambda_con=0.1)
    QccStep({0: [1]}, np.zeros(3, dtype=bool), weights, rule="semantic", positive_gap=0.3)(
        RecordingModel(), batch, torch.device("cpu"))
    assert not seen["negatives"][0, 1] and not seen["negatives"][1, 0]
    assert seen["positives"][0, 1] and seen["positives"][1, 0] and seen["gap"] == 0.3
    assert seen["negatives"][0, 2] and seen["negatives"][2, 0]  # quality gap 0.8 > 0.3
    QccStep({0: [1]}, np.zeros(3, dtype=bool), weights, rule="aliasing")(RecordingModel(), batch, torch.device("cpu"))
    assert seen["negatives"][0, 1] and seen["positives"] is None and not seen["negatives"][0, 2]
