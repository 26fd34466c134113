"""MLflow tracking of the steps in the embedded default store (SQLite file + artifact folder): parameters,
per-epoch metrics, artifacts, tags; no duplicate run for the same inputs; a failed step ends FAILED; a
tracking server that is down is a clear error; tracking off touches no store."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from test_registry import RUN, free_port, one_thread  # noqa: F401  (one_thread: autouse)

from qfm.config import TrackingParams, TrainParams, load_params
from qfm.errors import ConfigError, DataError, QfmError
from qfm.steps.evaluate import evaluate
from qfm.steps.teacher import train_teacher
from qfm.tracking import data_tags, dvc_data_hash, git_commit, pipeline_run_id

TINY = TrainParams(epochs=2, batch_size=4, n_crops=1, crop_size=96, test_grid="1x2", workers=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TrackingParams:
    folder = tmp_path_factory.mktemp("store")
    return TrackingParams(enabled=True, uri=f"sqlite:///{folder}/mlflow.db", artifacts=str(folder / "mlartifacts"),
                          experiment="tracking-test", pipeline_run="pipeline-42")


@pytest.fixture(scope="module")
def client(store):
    import mlflow

    return mlflow.MlflowClient(store.uri)


@pytest.fixture(scope="module")
def teacher(tiny_demo, tmp_path_factory, store) -> Path:
    out = tmp_path_factory.mktemp("tracked") / "teacher"
    train_teacher(tiny_demo, out, TINY, RUN, progress=False, tracking=store)
    return out


def runs(client, store, step: str):
    experiment = client.get_experiment_by_name(store.experiment)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`qfm.step` = '{step}'")


def test_training_run_holds_params_epochs_artifacts_and_tags(teacher, client, store, tiny_demo):
    (run,) = runs(client, store, "train_teacher")
    assert run.info.status == "FINISHED"
    assert run.data.params["train_teacher.epochs"] == "2" and run.data.params["run.split"] == "split_0"
    assert run.data.params["train_teacher.model_options"] == "{}"
    history = json.loads((teacher / "history.json").read_text())
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in losses] == [(r["epoch"], pytest.approx(r["loss"])) for r in history]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_srcc")] == [0, 1]
    summary = json.loads((teacher / "summary.json").read_text())
    assert run.data.metrics["summary_val_srcc"] == pytest.approx(summary["val"]["srcc"])
    assert run.data.metrics["val_srcc"] == pytest.approx(history[-1]["val_srcc"])  # the last epoch's
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"summary.json", "history.json", "training_curves.png"}
    assert Path(store.artifacts).is_dir() and any(Path(store.artifacts).rglob("training_curves.png"))
    tags = run.data.tags
    assert tags["qfm.pipeline_run"] == "pipeline-42"
    assert tags["qfm.git_commit"] == git_commit(str(Path.cwd()))[0]
    assert tags["qfm.dvc_data_hash"] == "untracked"  # the tiny demo is not under DVC
    assert json.loads(tags["qfm.split_protocol"])["seed"] == 2024 and tags["qfm.split"] == "split_0"
    assert tags["qfm.data_version"] == data_tags(tiny_demo, "split_0")["qfm.data_version"]
    assert tags["qfm.checkpoint.best.safetensors"] == (teacher / "best.safetensors").resolve().as_uri()
    assert tags["qfm.checkpoint_sha256"] == (teacher / "best.safetensors.sha256").read_text().strip()


def test_same_inputs_twice_make_one_finished_run(teacher, client, store, tiny_demo, tmp_path, capsys):
    first = evaluate(tiny_demo, teacher, tmp_path / "a", RUN, workers=0, progress=False, tracking=store)
    again = evaluate(tiny_demo, teacher, tmp_path / "b", RUN, workers=0, progress=False, tracking=store)
    assert first == again
    (run,) = runs(client, store, "evaluate")
    assert "already recorded as run " + run.info.run_id in capsys.readouterr().err
    assert run.data.metrics["srcc"] == pytest.approx(first["srcc"]) and run.data.params["part"] == "test"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "predictions.csv",
                                                                        "scatter.png"}
    evaluate(tiny_demo, teacher, tmp_path / "c", RUN, part="val", workers=0, progress=False, tracking=store)
    assert len(runs(client, store, "evaluate")) == 2  # another part is another input: a new run


def test_a_failing_step_ends_its_run_failed(client, store, tiny_demo, tmp_path):
    tracking = replace(store, experiment="tracking-failures")
    with pytest.raises(DataError, match="no trained model"):
        evaluate(tiny_demo, tmp_path / "no-model", tmp_path / "out", RUN, progress=False, tracking=tracking)
    (run,) = runs(client, tracking, "evaluate")
    assert run.info.status == "FAILED" and "no trained model" in run.data.tags["qfm.error"]


def test_a_tracking_server_that_is_down_is_named_and_no_step_runs(tiny_demo, teacher, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(QfmError, match=f"MLflow tracking server {uri} is not reachable"):
        evaluate(tiny_demo, teacher, tmp_path / "out", RUN, progress=False,
                 tracking=TrackingParams(enabled=True, uri=uri))
    assert time.monotonic() - started < 15
    assert not (tmp_path / "out").exists()


def test_environment_uri_overrides_the_params(tiny_demo, teacher, tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(QfmError, match=uri):
        evaluate(tiny_demo, teacher, tmp_path / "out", RUN, progress=False,
                 tracking=TrackingParams(enabled=True, uri=f"sqlite:///{tmp_path}/unused.db"))
    assert not (tmp_path / "unused.db").exists()


def test_tracking_off_touches_no_store(tiny_demo, teacher, tmp_path):
    evaluate(tiny_demo, teacher, tmp_path / "out", RUN, workers=0, progress=False,
             tracking=TrackingParams(enabled=False, uri=f"sqlite:///{tmp_path}/off.db"))
    assert (tmp_path / "out" / "metrics.json").is_file() and not (tmp_path / "off.db").exists()


def test_dvc_data_hash_comes_from_the_dvc_file_or_the_lock(tmp_path):
    (tmp_path / "data" / "livec").mkdir(parents=True)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: data\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  demo_data:\n    outs:\n"
                                       "    - path: artifacts/demo\n      md5: 4567ef.dir\n")
    (tmp_path / "artifacts" / "demo").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    assert dvc_data_hash(tmp_path / "data" / "livec", tmp_path) == "0123abcd.dir (data.dvc)"
    assert dvc_data_hash(tmp_path / "artifacts" / "demo", tmp_path) == "4567ef.dir (dvc.lock: demo_data)"
    assert dvc_data_hash(tmp_path / "elsewhere", tmp_path) is None


def test_pipeline_run_id_groups_one_code_and_params_version(monkeypatch):
    monkeypatch.delenv("QFM_PIPELINE_RUN", raising=False)
    params = load_params(None)
    same = pipeline_run_id(load_params(None, overrides=["tracking.experiment=other"]))
    assert pipeline_run_id(params) == same and same.startswith("cfg-")
    assert pipeline_run_id(load_params(None, overrides=["train_student.lambda_qcc=0"])) != same
    monkeypatch.setenv("QFM_PIPELINE_RUN", "kfp-run-7")
    assert pipeline_run_id(params) == "kfp-run-7"


def test_tracking_and_promote_params_are_checked_by_name():
    with pytest.raises(ConfigError, match="unknown key 'tracking.enabeld'.*did you mean 'enabled'"):
        load_params(None, overrides=["tracking.enabeld=true"])
    with pytest.raises(ConfigError, match="'promote.margin' must be float"):
        load_params(None, overrides=["promote.margin=high"])
    assert load_params(None)["tracking"].enabled is False  # on only where a params file says so


def test_cli_step_logs_to_the_default_store_in_the_working_folder(tiny_demo, teacher, store, tmp_path, monkeypatch):
    """`qfm evaluate --set tracking.enabled=true` run in a folder logs to the default store there,
    sqlite:///mlflow.db, with its artifacts in mlartifacts/; the stage's group id is derived."""
    import mlflow

    from qfm.cli import main

    # an initialised store file (saves the 6 s schema creation); the experiment, run and artifacts are the CLI's
    shutil.copy(store.uri.removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("QFM_PIPELINE_RUN", raising=False)
    assert main(["evaluate", "--manifest", str(tiny_demo), "--model", str(teacher), "--out", "eval", "--set",
                 "tracking.enabled=true", "--set", "run.device=cpu", "--quiet"]) == 0
    local = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = local.search_runs([local.get_experiment_by_name("qfm").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["qfm.pipeline_run"].startswith("cfg-")
    assert {a.path for a in local.list_artifacts(run.info.run_id)} >= {"metrics.json"}
    assert any((tmp_path / "mlartifacts").rglob("metrics.json"))


@pytest.mark.parametrize("artifacts, expected", [("s3://team-bucket/mlflow", "s3://team-bucket/mlflow"),
                                                 ("relative/folder", None)])
def test_artifact_root_uri_is_kept_and_a_folder_becomes_a_file_uri(tmp_path, monkeypatch, artifacts, expected):
    import mlflow

    from qfm.tracking import experiment_id

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/store.db"
    params = TrackingParams(enabled=True, uri=uri, artifacts=artifacts, experiment="artifact-root")
    client = mlflow.MlflowClient(uri)
    location = client.get_experiment(experiment_id(client, params, uri)).artifact_location
    assert location == (expected or (tmp_path / artifacts).resolve().as_uri())
