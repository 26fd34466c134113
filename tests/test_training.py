"""Training on a tiny demo: the whole teacher -> DLE -> SNM -> student -> evaluate chain, exact resume,
refused corrupt checkpoints, NaN stops, the pair-aware sampler and the empty-pair-table rule."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TRAINING

from qfm.config import BankParams, PseudoLabelParams, RunParams, StudentParams, TrainParams
from qfm.data.manifest import read_manifest
from qfm.data.torch_dataset import CropConfig, ManifestCropDataset, make_loader
from qfm.errors import ConfigError, DataError
from qfm.losses import NonFiniteLossError
from qfm.steps.bank import build_bank
from qfm.steps.evaluate import evaluate
from qfm.steps.pseudo_label import pseudo_label
from qfm.steps.student import train_student
from qfm.steps.teacher import train_teacher
from qfm.train.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from qfm.train.engine import predict
from qfm.train.fit import build_model, crop_config, fit, load_trained_model
from qfm.train.sampler import PairBatches, ShuffledBatches, pairs_in_batch
from qfm.train.steps import plain_step

TINY = TINY_TRAINING  # the recipe of the shared tiny_teacher
RUN = RunParams(split="split_0", device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chain(tiny_demo, tiny_teacher, tmp_path_factory):
    """Run every training-time step once (the teacher is the session's tiny_teacher, trained with TINY on
    split_0 as RUN asks); the tests below read what each step wrote."""
    out = tmp_path_factory.mktemp("chain")
    shutil.copytree(tiny_teacher[0], out / "teacher")
    teacher = tiny_teacher[1]
    pseudo = pseudo_label(tiny_demo, out / "teacher", out / "pseudo", PseudoLabelParams(workers=0), RUN,
                          progress=False)
    bank = build_bank(tiny_demo, out / "teacher", out / "pseudo", out / "bank",
                      BankParams(tau=0.05, workers=0), RUN, progress=False)
    student = train_student(tiny_demo, out / "student", StudentParams(**TINY, lambda_kd=0.5, lambda_con=0.1),
                            RUN, teacher_dir=out / "teacher", pseudo_dir=out / "pseudo", bank_dir=out / "bank",
                            progress=False)
    metrics = evaluate(tiny_demo, out / "student", out / "eval", RUN, workers=0, progress=False)
    return {"out": out, "teacher": teacher, "pseudo": pseudo, "bank": bank, "student": student, "metrics": metrics}


def test_teacher_selects_on_validation_and_writes_its_files(chain, tiny_demo):
    manifest = read_manifest(tiny_demo)
    teacher = chain["teacher"]
    assert teacher["selected_on"] == "val srcc"
    assert teacher["n_train"] == int((manifest.frame["split_0"] == "train").sum())
    assert teacher["n_val"] == int((manifest.frame["split_0"] == "val").sum())
    for name in (BEST, LAST, "history.json", "training_curves.png", "summary.json"):
        assert (chain["out"] / "teacher" / name).is_file(), name
    assert teacher["weights"].startswith("packaged:")


def test_pseudo_labels_leave_out_held_out_content_and_keep_the_confident_half(chain, tiny_demo):
    manifest = read_manifest(tiny_demo)
    table = pd.read_parquet(chain["out"] / "pseudo" / "pseudo_labels.parquet")
    held_out = set(manifest.frame.loc[manifest.frame["split_0"] != "train", "content_id"])
    assert not set(table["content_id"]) & held_out
    assert chain["pseudo"]["n_excluded_heldout_content"] > 0
    assert table["score"].between(0, 1).all() and (table["uncertainty"] >= 0).all()
    kept = table[table["kept"]]
    assert len(kept) == round(0.5 * len(table))
    assert kept["uncertainty"].max() <= table.loc[~table["kept"], "uncertainty"].min()


def test_bank_holds_only_training_images_and_pairs_obey_the_rule(chain, tiny_demo):
    manifest = read_manifest(tiny_demo)
    bank = pd.read_parquet(chain["out"] / "bank" / "bank.parquet")
    not_train = set(manifest.frame.loc[manifest.frame["split_0"] != "train", "image_id"])
    assert not set(bank["image_id"]) & not_train
    assert bank["is_pseudo"].sum() == chain["pseudo"]["n_kept"]
    pairs = pd.read_parquet(chain["out"] / "bank" / "pairs.parquet")
    assert len(pairs) > 0 and (pairs["quality_gap"].abs() >= 0.05 - 1e-9).all()
    content = dict(zip(bank["image_id"], bank["content_id"]))
    assert all(content[a] != content[p] for a, p in zip(pairs["anchor_id"], pairs["partner_id"]))


def test_student_trains_with_qcc_pseudo_labels_and_is_evaluated(chain):
    student = chain["student"]
    assert student["qcc"] and student["n_anchors_with_partners"] > 0
    assert student["n_pseudo"] == chain["pseudo"]["n_kept"]
    history = json.loads((chain["out"] / "student" / "history.json").read_text())
    for part in ("loss_quality", "loss_pseudo", "loss_qcc", "loss_distill", "loss_contrastive"):
        assert part in history[0] and np.isfinite(history[0][part]), part
    metrics = json.loads((chain["out"] / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["n"] == chain["metrics"]["n"] > 0
    assert -1 <= metrics["metrics"]["srcc"] <= 1 and metrics["part"] == "test"
    assert (chain["out"] / "eval" / "scatter.png").stat().st_size > 1000
    predictions = pd.read_csv(chain["out"] / "eval" / "predictions.csv")
    assert len(predictions) == metrics["metrics"]["n"]


def test_evaluation_is_deterministic(chain, tiny_demo, tmp_path):
    again = evaluate(tiny_demo, chain["out"] / "student", tmp_path, RUN, workers=0, progress=False)
    assert again["srcc"] == chain["metrics"]["srcc"] and again["plcc_raw"] == chain["metrics"]["plcc_raw"]


def test_empty_pair_table_stops_the_student_unless_allowed(chain, tiny_demo, tmp_path):
    bank = tmp_path / "bank"
    bank.mkdir()
    pd.read_parquet(chain["out"] / "bank" / "pairs.parquet").iloc[:0].to_parquet(bank / "pairs.parquet")
    params = StudentParams(**TINY)
    with pytest.raises(DataError, match="allow_empty_pairs"):
        train_student(tiny_demo, tmp_path / "s", params, RUN, bank_dir=bank, progress=False)
    with pytest.warns(UserWarning, match="without QCC"):
        summary = train_student(tiny_demo, tmp_path / "s", StudentParams(**TINY, allow_empty_pairs=True), RUN,
                                bank_dir=bank, progress=False, pseudo_dir=None)
    assert summary["qcc"] is False


class Interrupted(Exception):
    pass


def _stop_after_first_epoch(record):
    raise Interrupted(record["epoch"])


def _fit(tiny_demo, out, epochs, resume=False, step=plain_step, on_epoch=None, **recipe):
    params = TrainParams(**(TINY | {"epochs": epochs} | recipe))
    manifest = read_manifest(tiny_demo)
    model = build_model(params)
    crops = crop_config(params, model)
    train = ManifestCropDataset(manifest, "split_0", "train", crops, train=True)
    val = ManifestCropDataset(manifest, "split_0", "val", crops)
    return fit(model, train, val, step, params, out, device="cpu", resume=resume, progress=False,
               on_epoch=on_epoch), model


@pytest.fixture(scope="module")
def straight(tiny_demo, tmp_path_factory) -> dict:
    """Two uninterrupted epochs; records every batch the training step was handed."""
    seen = []

    def recording_step(model, batch, device):
        seen.append(batch["image"])
        return plain_step(model, batch, device)

    out = tmp_path_factory.mktemp("straight")
    result, model = _fit(tiny_demo, out, epochs=2, step=recording_step)
    return {"out": out, "result": result, "model": model, "seen": seen}


@pytest.fixture(scope="module")
def interrupted(tiny_demo, tmp_path_factory) -> Path:
    """The same two epochs, but the process dies right after epoch 0's checkpoint. Tests resume a copy."""
    out = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(Interrupted):
        _fit(tiny_demo, out, epochs=2, on_epoch=_stop_after_first_epoch)
    return out


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_demo, straight, interrupted, tmp_path):
    shutil.copytree(interrupted, tmp_path / "b")
    resumed, model_b = _fit(tiny_demo, tmp_path / "b", epochs=2, resume=True)
    for (name, a), b in zip(straight["model"].state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in straight["result"].history] == [h["loss"] for h in resumed.history]


def test_last_and_averaged_selection_save_the_fixed_schedules_model_and_resume(tiny_demo, tmp_path, monkeypatch):
    import qfm.train.fit as fit_module

    built, seen = [], {}
    create = fit_module.create_model
    monkeypatch.setattr(fit_module, "create_model", lambda *a, **kw: built.append(create(*a, **kw)) or built[-1])

    def keep(record):  # the weights at the end of each epoch
        seen[record["epoch"]] = {k: v.clone() for k, v in built[-1].state_dict().items()}

    result, _ = _fit(tiny_demo, tmp_path / "avg", epochs=3, on_epoch=keep, select="average", average_epochs=2)
    assert result.best_epoch == 2 and result.selected_on == "the mean weights of epochs 1-2, fixed in advance"
    saved = load_checkpoint(tmp_path / "avg" / BEST)["model"]
    floats = [k for k, v in saved.items() if v.is_floating_point()]
    for name in floats:
        assert torch.allclose(saved[name], (seen[1][name] + seen[2][name]) / 2, atol=1e-6), name
    assert any(not torch.allclose(saved[k], seen[2][k], atol=1e-6) for k in floats)  # not the last epoch's
    assert result.best_val["srcc"] == result.history[-1]["averaged_val"]["srcc"]
    # interrupted inside the averaged epochs, then resumed: the same averaged model
    with pytest.raises(Interrupted):
        _fit(tiny_demo, tmp_path / "resumed", epochs=3, select="average", average_epochs=2,
             on_epoch=lambda r: r["epoch"] == 1 and _stop_after_first_epoch(r))
    _fit(tiny_demo, tmp_path / "resumed", epochs=3, select="average", average_epochs=2, resume=True)
    again = load_checkpoint(tmp_path / "resumed" / BEST)["model"]
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    last, _ = _fit(tiny_demo, tmp_path / "last", epochs=2, select="last")
    assert last.best_epoch == 1 and last.selected_on == "the last epoch (1), fixed in advance"
    with pytest.raises(ConfigError, match=r"average_epochs must be between 1 and epochs \(2\)"):
        _fit(tiny_demo, tmp_path / "bad", epochs=2, select="average", average_epochs=3)
    with pytest.raises(ConfigError, match="select must be one of"):
        _fit(tiny_demo, tmp_path / "bad", epochs=2, select="median")


def test_corrupt_or_partial_checkpoint_is_refused(tmp_path):
    path = save_checkpoint({"x": torch.arange(10)}, tmp_path / "last.safetensors")
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(10))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or partial"):
        load_checkpoint(path)
    (tmp_path / "last.safetensors.sha256").unlink()
    with pytest.raises(DataError, match="no checksum"):
        load_checkpoint(path)


def test_nan_loss_stops_with_step_and_batch_named_and_keeps_the_last_good_checkpoint(tiny_demo, interrupted,
                                                                                    tmp_path):
    shutil.copytree(interrupted, tmp_path, dirs_exist_ok=True)
    good = load_checkpoint(tmp_path / LAST)

    def nan_step(model, batch, device):
        loss, log = plain_step(model, batch, device)
        return loss * float("nan"), log | {"loss": float("nan")}

    with pytest.raises(NonFiniteLossError, match=r"at step \d+; batch images: images/"):
        _fit(tiny_demo, tmp_path, epochs=2, resume=True, step=nan_step)
    after = load_checkpoint(tmp_path / LAST)
    assert after["epoch"] == good["epoch"] == 0


def test_unknown_split_column_is_named(tiny_demo, tmp_path):
    with pytest.raises(ConfigError, match="split_9"):
        train_teacher(tiny_demo, tmp_path, TrainParams(**TINY), RunParams(split="split_9", device="cpu"),
                      progress=False)


def test_pair_batches_keep_each_pair_together_and_visit_every_image_once():
    partners = {0: [5], 1: [2, 3], 7: [8], 9: [0]}
    sampler = PairBatches(12, 4, partners, seed=3)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) and len(flat) == 4 * (len(flat) // 4)
        assert all(len(b) == 4 for b in batches)
        for batch in batches:
            for a, p in pairs_in_batch(batch, partners):
                assert batch[p] in partners[batch[a]]
        assert batches == list(sampler)  # the same order for the same (seed, epoch)
    first = [list(ShuffledBatches(12, 4, seed=1)), list(ShuffledBatches(12, 4, seed=1))]
    assert first[0] == first[1]


def test_synthetic_pool_distorts_train_images_only(chain, tiny_demo, tmp_path):
    summary = pseudo_label(tiny_demo, chain["out"] / "teacher", tmp_path,
                           PseudoLabelParams(pool="synthetic", synthetic_per_image=2, workers=0), RUN, progress=False)
    manifest = read_manifest(tiny_demo)
    train = manifest.frame[manifest.frame["split_0"] == "train"]
    table = pd.read_parquet(tmp_path / "pseudo_labels.parquet")
    assert summary["n_pool"] == len(table) == 2 * len(train)
    assert set(table["content_id"]) <= set(train["content_id"])
    assert all((tmp_path / "pool" / p.rsplit("/", 1)[-1]).is_file() for p in table["path"])
    assert table["kept"].sum() == round(0.5 * len(table))


def test_training_gets_uint8_channels_last_batches_and_checkpoints_say_so(straight):
    seen = straight["seen"]
    assert seen and all(x.dtype == torch.uint8 and x.is_contiguous(memory_format=torch.channels_last)
                        and not x.is_contiguous() for x in seen)
    crop = load_checkpoint(straight["out"] / BEST)["crop"]
    assert crop["dtype"] == "uint8" and CropConfig(**crop).dtype == "uint8"


def test_uint8_and_float32_loaders_give_the_same_predictions(chain, tiny_demo):
    model, state = load_trained_model(chain["out"] / "student" / BEST)
    manifest = read_manifest(tiny_demo)
    config = CropConfig(**state["crop"])
    assert config.dtype == "uint8" and (config.mean, config.std) == (model.mean, model.std)
    scores = {}
    for dtype in ("uint8", "float32"):
        dataset = ManifestCropDataset(manifest, "split_0", "test", replace(config, dtype=dtype))
        index, scores[dtype], _ = predict(model, make_loader(dataset, 4), torch.device("cpu"), progress=False)
        assert index.tolist() == list(range(len(dataset)))
    assert np.allclose(scores["uint8"], scores["float32"], rtol=0, atol=1e-5)


def test_crop_normalisation_must_match_the_model(chain, tiny_demo, tmp_path):
    params = TrainParams(**TINY)
    model = build_model(params)
    wrong = replace(crop_config(params, model), mean=(0.5, 0.5, 0.5))
    manifest = read_manifest(tiny_demo)
    train = ManifestCropDataset(manifest, "split_0", "train", wrong, train=True)
    val = ManifestCropDataset(manifest, "split_0", "val", crop_config(params, model))
    with pytest.raises(ConfigError, match=r"training dataset: crop mean \(0.5, 0.5, 0.5\) differs from the model"):
        fit(model, train, val, plain_step, params, tmp_path / "fit", device="cpu", progress=False)
    state = load_checkpoint(chain["out"] / "teacher" / BEST)
    state["crop"]["std"] = [0.5, 0.5, 0.5]
    bad = save_checkpoint(state, tmp_path / BEST)
    with pytest.raises(ConfigError, match=r"best.safetensors: crop std .* differs from the model's std"):
        load_trained_model(bad)
