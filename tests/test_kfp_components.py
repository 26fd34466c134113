"""Each Kubeflow component's Python function, called directly on the tiny demo (real files, real steps)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

import components as qc
from qfm.config import load_params
from qfm.data.manifest import read_manifest
from qfm.errors import ConfigError, DataError

TINY = [f"{section}.{item}" for section in ("train_teacher", "train_student")
        for item in ("epochs=1", "batch_size=8", "n_crops=1", "crop_size=64", "test_grid=1x1", "workers=0")] + [
    "run.device=cpu", "validate.min_width=96", "validate.min_height=96", "splits.n_splits=2",
    "splits.val_fraction=0.25", "pseudo_label.workers=0", "build_bank.workers=0", "build_bank.tau=0.05"]


def sections(*overrides: str) -> dict[str, str]:
    """params.yaml sections as the pipeline passes them: JSON text."""
    params = load_params(None, overrides=[*TINY, *overrides])
    return {name: json.dumps(dataclasses.asdict(value)) for name, value in params.items()}


def out(cls, path: Path):
    """An output artifact at a local path, as the KFP launcher hands it to the function."""
    return cls(name=path.name, uri=str(path))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tiny_demo) -> Dataset:
    return Dataset(name="dataset", uri=str(tiny_demo.parent / "demo"))


@pytest.fixture(scope="module")
def manifest(demo, tmp_path_factory) -> Dataset:
    s = sections()
    artifact = out(Dataset, tmp_path_factory.mktemp("kfp-ingest") / "manifest")
    qc.ingest.python_func(dataset=demo, params=s["ingest"], splits=s["splits"], tracking=s["tracking"],
                          manifest=artifact)
    return artifact


@pytest.fixture(scope="module")
def chain(demo, manifest, tmp_path_factory) -> dict:
    """teacher -> pseudo-label -> bank -> student -> evaluate, each through its component function."""
    s, tmp = sections(), tmp_path_factory.mktemp("kfp-chain")
    a = {"teacher": out(Model, tmp / "teacher"), "teacher_metrics": out(Metrics, tmp / "teacher_metrics"),
         "pseudo": out(Dataset, tmp / "pseudo"), "bank": out(Dataset, tmp / "bank"),
         "student": out(Model, tmp / "student"), "student_metrics": out(Metrics, tmp / "student_metrics"),
         "results": out(Dataset, tmp / "results"), "metrics": out(Metrics, tmp / "metrics"),
         "report": out(Markdown, tmp / "report.md")}
    common = {"manifest": manifest, "dataset": demo, "run": s["run"], "tracking": s["tracking"]}
    qc.train_teacher.python_func(**common, params=s["train_teacher"], model=a["teacher"], metrics=a["teacher_metrics"])
    qc.pseudo_label.python_func(**common, teacher=a["teacher"], params=s["pseudo_label"], pseudo=a["pseudo"])
    qc.build_bank.python_func(**common, teacher=a["teacher"], pseudo=a["pseudo"], params=s["build_bank"],
                              bank=a["bank"])
    qc.train_student.python_func(**common, teacher=a["teacher"], pseudo=a["pseudo"], bank=a["bank"],
                                 params=s["train_student"], model=a["student"], metrics=a["student_metrics"])
    a["returned"] = qc.evaluate.python_func(**common, model=a["student"], results=a["results"], metrics=a["metrics"],
                                            report=a["report"])
    return a


def test_ingest_writes_a_manifest_of_every_scored_image(demo, manifest):
    scored = pd.read_csv(Path(demo.path) / "scores.csv")
    written = read_manifest(manifest.path, root=demo.path)
    assert len(written.frame) == len(scored) == manifest.metadata["n_images"]
    assert written.split_columns == ["split_0", "split_1"]
    assert manifest.metadata["dataset"] == "demo" and manifest.metadata["n_skipped"] == 0
    assert written.frame["mos"].between(0, 1).all()


def test_section_parameters_are_checked_by_the_schema(demo, tmp_path):
    s = sections()
    target = out(Dataset, tmp_path / "m")
    with pytest.raises(ConfigError, match="pipeline parameter 'ingest' is not a JSON object"):
        qc.ingest.python_func(dataset=demo, params="format: demo", splits=s["splits"], tracking=s["tracking"],
                              manifest=target)
    with pytest.raises(ConfigError, match="unknown key 'splits.n_split'"):
        qc.ingest.python_func(dataset=demo, params=s["ingest"], splits='{"n_split": 2}', tracking=s["tracking"],
                              manifest=target)
    with pytest.raises(ConfigError, match="'splits.n_splits' must be int, got 2.0"):  # why sections travel as JSON
        qc.ingest.python_func(dataset=demo, params=s["ingest"], splits='{"n_splits": 2.0}',
                              tracking=s["tracking"], manifest=target)
    with pytest.raises(ConfigError, match="unknown dataset format 'demoo'"):
        qc.ingest.python_func(dataset=demo, params='{"format": "demoo"}', splits=s["splits"], tracking=s["tracking"],
                              manifest=target)
    assert not (tmp_path / "m").exists()


def test_validate_reports_in_html_and_fails_on_a_failed_check(demo, manifest, tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    report, details = out(HTML, tmp_path / "ok.html"), out(Artifact, tmp_path / "ok.json")
    qc.validate.python_func(manifest=manifest, dataset=demo, params=sections()["validate"],
                            tracking=sections()["tracking"], report=report, details=details)
    assert "passed" in Path(report.path).read_text()
    checks = json.loads(Path(details.path).read_text())
    assert checks["success"] is True and details.metadata["failed"] == 0 and details.metadata["passed"] > 5
    report, details = out(HTML, tmp_path / "bad.html"), out(Artifact, tmp_path / "bad.json")
    with pytest.raises(DataError, match="min_width|width"):
        qc.validate.python_func(manifest=manifest, dataset=demo, params='{"min_width": 4096, "min_height": 96}',
                                tracking="{}", report=report, details=details)
    assert "FAILED" in Path(report.path).read_text()  # the report is written before the step fails
    assert not list((tmp_path / "tmp").glob("qfm-validate-*"))  # its working folder is gone, pass or fail


def test_a_steps_manifest_copy_is_removed_when_its_process_ends(demo, manifest, tmp_path):
    code = ("import sys; from pathlib import Path; from components.base import local_manifest; "
            "work = local_manifest(sys.argv[1], sys.argv[2]); print(work, (Path(work) / 'manifest.parquet').is_file())")
    done = subprocess.run([sys.executable, "-c", code, manifest.path, demo.path], capture_output=True, text=True,
                          check=True, env=os.environ | {"TMPDIR": str(tmp_path)}, cwd=Path(__file__).parents[1])
    work, written = done.stdout.split()
    assert written == "True" and Path(work).parent == tmp_path and not Path(work).exists()


def test_training_components_log_the_chosen_epochs_validation_metrics(chain):
    for model, metrics in (("teacher", "teacher_metrics"), ("student", "student_metrics")):
        summary = json.loads((Path(chain[model].path) / "summary.json").read_text())
        assert (Path(chain[model].path) / "best.safetensors").is_file()
        assert chain[metrics].metadata["val_srcc"] == pytest.approx(summary["val"]["srcc"])
        assert chain[metrics].metadata["val_plcc_raw"] == pytest.approx(summary["val"]["plcc_raw"])
        assert chain[metrics].metadata["best_epoch"] == summary["best_epoch"] == 0
        assert chain[model].metadata["selected_on"] == "val srcc"
    assert chain["student"].metadata["qcc"] is True


def test_dle_and_snm_components_write_their_tables(chain):
    table = pd.read_parquet(Path(chain["pseudo"].path) / "pseudo_labels.parquet")
    assert chain["pseudo"].metadata["n_kept"] == int(table["kept"].sum()) > 0
    pairs = pd.read_parquet(Path(chain["bank"].path) / "pairs.parquet")
    assert chain["bank"].metadata["n_pairs"] == len(pairs) > 0
    assert chain["bank"].metadata["n_pseudo"] == chain["pseudo"].metadata["n_kept"]
    assert chain["student"].metadata["n_pseudo"] == chain["pseudo"].metadata["n_kept"]


def test_evaluate_logs_srcc_plcc_and_returns_the_gate_value(chain):
    written = json.loads((Path(chain["results"].path) / "metrics.json").read_text())["metrics"]
    logged = chain["metrics"].metadata
    assert logged["srcc"] == pytest.approx(written["srcc"]) and logged["plcc_raw"] == pytest.approx(written["plcc_raw"])
    assert logged["n"] == written["n"] == len(pd.read_csv(Path(chain["results"].path) / "predictions.csv"))
    assert chain["returned"] == pytest.approx(written["srcc"])
    report = Path(chain["report"].path).read_text()
    assert f"| SRCC | {written['srcc']:.4f} |" in report and "PLCC logistic-fitted" in report
    assert (Path(chain["results"].path) / "scatter.png").stat().st_size > 1000


def test_promote_registers_the_student_as_champion_in_mlflow(chain, demo, manifest, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a local store keeps its artifacts under ./mlartifacts
    s = sections()
    promotion = out(Artifact, tmp_path / "promotion")
    model_uri = qc.promote.python_func(manifest=manifest, dataset=demo, model=chain["student"],
                                       evaluation=chain["results"], params=s["promote"], run=s["run"],
                                       tracking=s["tracking"], promotion=promotion)
    result = json.loads((tmp_path / "promotion" / "promotion.json").read_text())
    assert model_uri == f"models:/qfm-iqm/{result['version']}" == "models:/qfm-iqm/1"
    assert result["promoted"] is True and promotion.metadata["aliases"] == "challenger,champion"
    version = MlflowClient(uri).get_model_version_by_alias("qfm-iqm", "champion")
    assert int(version.version) == 1 and set(version.aliases) == {"challenger", "champion"}
    assert float(version.tags["qfm.test_srcc"]) == pytest.approx(chain["returned"])


def test_steps_log_to_mlflow_when_tracking_is_on(demo, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    s = sections("tracking.enabled=true", "tracking.pipeline_run=kfp-test")
    manifest = out(Dataset, tmp_path / "manifest")
    qc.ingest.python_func(dataset=demo, params=s["ingest"], splits=s["splits"], tracking=s["tracking"],
                          manifest=manifest)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("qfm").experiment_id])
    assert run.data.tags["qfm.step"] == "ingest" and run.data.tags["qfm.pipeline_run"] == "kfp-test"
    assert run.data.metrics["n_images"] == manifest.metadata["n_images"] and run.info.status == "FINISHED"
