"""The final model (qfm train-final on all labelled images), its package, the scoring API and the MOS scale."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import qfm
from qfm import packaged
from qfm.cli import main
from qfm.config import load_params
from qfm.data.manifest import ScoreScale, read_manifest
from qfm.errors import ConfigError, DataError
from qfm.steps.final import FINAL_SPLIT, carve_final_split, train_final

ROOT = Path(__file__).resolve().parents[1]
# The tiny recipe: one epoch, one crop, the plain fine-tune (every QFM part off), one thread.
TINY = ["train_student.qcc=false", "train_student.use_pseudo_labels=false", "train_student.epochs=1",
        "train_student.n_crops=1", "train_student.batch_size=8", "train_student.test_grid=2x1",
        "tracking.enabled=false", "run.threads=1", "run.device=cpu"]


@pytest.fixture(scope="module")
def final_model(tiny_demo, tmp_path_factory, one_torch_thread) -> Path:
    out = tmp_path_factory.mktemp("final") / "model"
    train_final(tiny_demo, out, load_params(None, TINY), val_fraction=0.34, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def package(final_model, tiny_demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("package") / "pretrained"
    notes = tmp_path_factory.mktemp("notes") / "notes.md"
    notes.write_text("### Demo data\n\nSynthetic demo photos; NOTICE-LINE quoted as given.\n")
    code = main(["train-final", "--manifest", str(tiny_demo), "--out", str(final_model), "--resume",
                 "--val-fraction", "0.34", "--seed", "0", "--package", str(out), "--card-notes", str(notes),
                 "--command-line", "qfm train-final (the test's)", "--quiet",
                 *[f"--set={o}" for o in TINY]])
    assert code == 0
    return out


@pytest.fixture
def use_package(package, monkeypatch) -> Path:
    """The test's package stands in for qfm/pretrained (what `qfm score` without --model and qfm.load() use)."""
    monkeypatch.setattr(packaged, "PRETRAINED_DIR", package)
    return package


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access while scoring with the packaged model")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _images(tiny_demo: Path, n: int = 3) -> list[Path]:
    manifest = read_manifest(tiny_demo)
    return [manifest.image_path(p) for p in manifest.frame["path"].iloc[:n]]


# --- the carved split -------------------------------------------------------------------------------------------

def test_final_split_keeps_every_image_and_carves_a_seeded_content_disjoint_val_part(tiny_demo):
    manifest = read_manifest(tiny_demo)
    carved = carve_final_split(manifest, 0.34, seed=0).frame
    assert len(carved) == len(manifest.frame)                       # every labelled image, none left out
    assert set(carved[FINAL_SPLIT]) == {"train", "val"}             # no test part
    assert carved.groupby("content_id")[FINAL_SPLIT].nunique().max() == 1   # content-disjoint
    n_content = manifest.frame["content_id"].nunique()
    assert carved.loc[carved[FINAL_SPLIT] == "val", "content_id"].nunique() == round(0.34 * n_content)
    again = carve_final_split(manifest, 0.34, seed=0).frame[FINAL_SPLIT]
    assert again.equals(carved[FINAL_SPLIT])
    others = {tuple(carve_final_split(manifest, 0.34, seed=s).frame[FINAL_SPLIT]) for s in range(1, 6)}
    assert len(others | {tuple(carved[FINAL_SPLIT])}) > 1          # the seed decides the carve


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, "0.1", True])
def test_final_split_refuses_a_bad_val_fraction(tiny_demo, fraction):
    with pytest.raises(ConfigError, match="--val-fraction"):
        carve_final_split(read_manifest(tiny_demo), fraction)


def test_final_split_needs_two_content_ids(tiny_demo):
    manifest = read_manifest(tiny_demo)
    manifest.frame["content_id"] = "same"
    with pytest.raises(DataError, match="at least 2 distinct content_id"):
        carve_final_split(manifest, 0.1)


# --- train-final on the demo ------------------------------------------------------------------------------------

def test_train_final_trains_on_all_images_and_writes_the_checkpoint_onnx_and_record(final_model, tiny_demo):
    for name in ("best.safetensors", "best.safetensors.sha256", "last.safetensors", "history.json",
                 "summary.json", "model.onnx", "final.json", "data/manifest.parquet"):
        assert (final_model / name).is_file(), name
    record = json.loads((final_model / "final.json").read_text())
    n = len(read_manifest(tiny_demo).frame)
    assert record["n_images"] == n and record["n_train"] + record["n_val"] == n and record["n_val"] > 0
    assert record["split_column"] == FINAL_SPLIT and record["chain"].startswith("plain fine-tune")
    assert record["scale"] == {"lo": 0.0, "hi": 100.0, "higher_is_better": True, "kind": "MOS"}
    assert record["recipe"]["epochs"] == 1 and record["torch_threads"] == 1
    assert -1 <= record["val"]["srcc"] <= 1
    assert "test" not in set(read_manifest(final_model / "data").frame[FINAL_SPLIT])


def test_the_promotion_gate_measures_the_final_models_validation_srcc(final_model):
    """promote's gate evaluates the model on the split's val part: for a final model, the carved part."""
    from qfm.config import RunParams
    from qfm.steps.promote import _val_metrics

    record = json.loads((final_model / "final.json").read_text())
    val = _val_metrics(final_model / "data", final_model, RunParams(split=FINAL_SPLIT, device="cpu"), 0, False)
    assert val["srcc"] == pytest.approx(record["val"]["srcc"], abs=1e-6)


def test_resume_and_package_leave_the_weights_unchanged(final_model, package):
    record = json.loads((package / "pretrained.json").read_text())
    best = hashlib.sha256((final_model / "best.safetensors").read_bytes()).hexdigest()
    assert record["files"]["model.safetensors"]["sha256"] == best   # --resume retrained nothing
    assert (package / "model.safetensors.sha256").read_text().strip() == best


# --- the package -------------------------------------------------------------------------------------------------

def test_package_holds_the_model_its_onnx_export_metadata_and_card(package):
    names = {p.name for p in package.iterdir()}
    assert names == {"model.safetensors", "model.safetensors.sha256", "model.onnx", "pretrained.json",
                     "MODEL_CARD.md"}
    assert sum(p.stat().st_size for p in package.iterdir()) <= 30_000_000
    meta = json.loads((package / "pretrained.json").read_text())
    for name, info in meta["files"].items():
        assert hashlib.sha256((package / name).read_bytes()).hexdigest() == info["sha256"]
    assert meta["scale"]["hi"] == 100.0 and "0-100" in meta["outputs"]["mos"]
    card = (package / "MODEL_CARD.md").read_text()
    assert "NOTICE-LINE quoted as given" in card                      # the data notes, unchanged
    assert f"| SRCC | {meta['val']['srcc']:.4f} |" in card
    assert "qfm train-final (the test's)" in card and meta["commit"] in card
    for section in ("## Data", "## Recipe", "## Validation figures", "## Preprocessing",
                    "## What it was not trained on", "## Train your own", "## Rebuild this model"):
        assert section in card


def test_package_refuses_a_folder_that_is_not_a_final_model(tmp_path):
    from qfm.steps.package import package_model

    with pytest.raises(DataError, match="not a final model folder"):
        package_model(tmp_path, tmp_path / "out")


def _score_cli(args: list[str], capsys) -> pd.DataFrame:
    """`qfm score ARGS` into a CSV file (a file, not captured stdout: a worker's stray output there once
    shifted the header), read back."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "scores.csv"
        assert main(["score", *args, "--quiet", "--out", str(out)]) == 0
        return pd.read_csv(out)


def test_qfm_score_without_model_uses_the_package_offline_on_both_engines(use_package, no_network, tiny_demo,
                                                                          capsys):
    images = [str(p) for p in _images(tiny_demo)]
    torch_scores = _score_cli(images, capsys)
    assert list(torch_scores.columns) == ["path", "score", "mos", "mos_scale", "crop_std", "error"]
    assert torch_scores["error"].isna().all()
    assert np.allclose(torch_scores["mos"], 100 * torch_scores["score"])
    assert set(torch_scores["mos_scale"]) == {"MOS 0-100 of demo, higher is better"}
    onnx_scores = _score_cli([*images, "--engine", "onnxruntime"], capsys)
    assert np.allclose(onnx_scores["score"], torch_scores["score"], atol=1e-4)


def test_qfm_score_names_a_missing_package(tmp_path, monkeypatch, tiny_demo, capsys):
    monkeypatch.setattr(packaged, "PRETRAINED_DIR", tmp_path / "nothing")
    assert main(["score", str(_images(tiny_demo, 1)[0]), "--quiet"]) == 2
    assert "no packaged model" in capsys.readouterr().err


# --- the Python API ----------------------------------------------------------------------------------------------

def test_api_scores_a_file_a_pil_image_an_array_and_a_list_alike(use_package, no_network, tiny_demo, capsys):
    path = _images(tiny_demo, 1)[0]
    cli = _score_cli([str(path)], capsys)["score"].iloc[0]
    model = qfm.load()
    assert model is not None and qfm.create_metric is qfm.load
    from_file = model.score(str(path))
    assert isinstance(from_file, float) and from_file == pytest.approx(cli, abs=1e-5)
    pil = Image.open(path)
    array = np.asarray(pil.convert("RGB"))
    assert model.score(pil) == pytest.approx(from_file, abs=1e-6)
    assert model.score(array) == pytest.approx(from_file, abs=1e-6)
    assert model.score(array.astype(np.float32) / 255) == pytest.approx(from_file, abs=1e-6)
    many = model.score([path, pil, array])
    assert isinstance(many, np.ndarray) and many.shape == (3,) and np.allclose(many, from_file, atol=1e-6)
    assert model.mos(path) == pytest.approx(100 * from_file)
    table = model.table([path, pil])
    assert list(table.columns) == ["path", "score", "mos", "mos_scale", "crop_std"]
    assert table["path"].tolist() == [str(path), f"<{type(pil).__name__}>"]


def test_api_onnxruntime_engine_matches_torch(use_package, tiny_demo):
    images = _images(tiny_demo)
    torch_scores = qfm.load().score(images)
    onnx_model = qfm.load(engine="onnxruntime")
    assert onnx_model.engine == "onnxruntime"
    assert np.allclose(onnx_model.score(images), torch_scores, atol=1e-4)


def test_api_names_what_it_cannot_score(use_package):
    model = qfm.load(engine="onnxruntime")
    with pytest.raises(DataError, match=r"shape \(3, 8, 8\)"):
        model.score(np.zeros((3, 8, 8), dtype=np.uint8))   # channels first
    with pytest.raises(DataError, match="values in \\[0, 1\\]"):
        model.score(np.full((8, 8, 3), 2.0))
    with pytest.raises(DataError, match="cannot score a dict"):
        model.score({"not": "an image"})
    with pytest.raises(ConfigError, match="unknown engine"):
        qfm.load(engine="tensorrt")


def test_import_qfm_is_light_and_the_onnx_api_imports_no_torch(package, tiny_demo):
    image = _images(tiny_demo, 1)[0]
    code = (f"import sys; import qfm; assert 'torch' not in sys.modules and 'qfm.api' not in sys.modules; "
            f"import qfm.packaged as p; from pathlib import Path; p.PRETRAINED_DIR = Path({str(package)!r}); "
            f"m = qfm.load(engine='onnxruntime'); s = m.score({str(image)!r}); "
            f"assert 'torch' not in sys.modules, 'torch'; "
            f"print(s)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    float(done.stdout.strip())


# --- the MOS scale -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lo, hi, higher, raw", [(0, 100, True, [0, 37.5, 100]), (1, 5, True, [1, 2.2, 5]),
                                                 (0, 9, False, [0, 4.5, 9])])
def test_to_mos_inverts_the_ingest_map(lo, hi, higher, raw):
    scale = {"lo": lo, "hi": hi, "higher_is_better": higher, "kind": "MOS" if higher else "DMOS"}
    unit = ScoreScale(lo, hi, higher).to_unit(np.array(raw))
    assert np.allclose(packaged.to_mos(unit, scale), raw)
    assert packaged.to_mos(1.0, scale) == (hi if higher else lo)      # the best score maps to the best raw end


def test_with_mos_names_the_scale_beside_the_score():
    frame = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "score": [0.25, 0.8], "crop_std": [0.0, 0.1]})
    out = packaged.with_mos(frame, {"lo": 1.0, "hi": 5.0, "higher_is_better": True, "kind": "MOS"}, "koniq10k")
    assert list(out.columns) == ["path", "score", "mos", "mos_scale", "crop_std"]
    assert out["mos"].tolist() == pytest.approx([2.0, 4.2])
    assert set(out["mos_scale"]) == {"MOS 1-5 of koniq10k, higher is better"}
    dmos = packaged.scale_label({"lo": 0.0, "hi": 100.0, "higher_is_better": False, "kind": "DMOS"})
    assert dmos == "DMOS 0-100, lower is better"


def test_a_broken_scale_record_is_named():
    with pytest.raises(DataError, match="pretrained.json"):
        packaged.check_scale({"lo": 5, "hi": 1, "higher_is_better": True}, "pretrained.json")


# --- the model that ships ----------------------------------------------------------------------------------------

SHIPPED = packaged.PRETRAINED_DIR


@pytest.mark.skipif(not (SHIPPED / "pretrained.json").is_file(),
                    reason="no packaged model yet: build it with scripts/build_pretrained.sh")
def test_the_shipped_model_is_small_intact_and_scores_offline(no_network, tiny_demo):
    files = list(SHIPPED.iterdir())
    assert sum(p.stat().st_size for p in files) <= 30_000_000
    meta = json.loads((SHIPPED / "pretrained.json").read_text())
    for name, info in meta["files"].items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == info["sha256"], name
    assert meta["scale"] == {"lo": 0.0, "hi": 100.0, "higher_is_better": True, "kind": "MOS"}
    assert meta["n_images"] == 600 and meta["n_train"] + meta["n_val"] == 600
    model = qfm.load()
    image = _images(tiny_demo, 1)[0]
    score = model.score(image)
    assert model.mos(image) == pytest.approx(100 * score)
    assert qfm.load(engine="onnxruntime").score(image) == pytest.approx(score, abs=1e-4)


# --- the pipelines -----------------------------------------------------------------------------------------------

def test_the_kubeflow_pipeline_trains_and_gates_a_final_model_on_request():
    """final_model (off by default) adds train-final after the split's evaluation, and promotes its model
    through the same two gates, with the carved manifest and the run section whose split is 'final'."""
    import yaml

    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "qfm_pipeline.yaml").read_text()))
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["final_model"]["defaultValue"] is False and json.loads(inputs["final"]["defaultValue"]) == {
        "val_fraction": 0.1, "seed": 2024}
    branch = spec["root"]["dag"]["tasks"]["condition-2"]
    assert branch["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--final_model'] == true"
    assert "evaluate" in branch["dependentTasks"]
    inner = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert inner["condition-3"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--train-final-val_srcc'] >= "
        "inputs.parameter_values['pipelinechannel--min_val_srcc']")
    promote = spec["components"]["comp-condition-3"]["dag"]["tasks"]["promote-2"]["inputs"]
    assert promote["artifacts"]["model"]["componentInputArtifact"] == "pipelinechannel--train-final-model"
    assert promote["artifacts"]["manifest"]["componentInputArtifact"] == "pipelinechannel--train-final-data"
    assert promote["parameters"]["run"]["componentInputParameter"] == "pipelinechannel--train-final-run"


def test_the_dvc_stage_trains_the_final_model_from_params_yaml():
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train_final"]
    assert stage["cmd"].startswith("qfm train-final --manifest artifacts/ingest --out artifacts/final")
    assert {"final", "train_student", "train_teacher"} <= set(stage["params"]) and stage["outs"] == ["artifacts/final"]
    assert load_params(ROOT / "params.yaml")["final"].val_fraction == 0.1
