"""promote: register the trained student as a model version and gate the `champion` alias.

Order, so that no alias ever names a half-registered version: log the pyfunc model in a run, register it,
wait until the version is READY, tag it (data version, validation and test metrics, checkpoint SHA-256),
then set `challenger`, then decide `champion`. The gate compares validation metrics on the same data: the
challenger is measured on the split's validation part of the given manifest (the deterministic multi-crop
test), the champion by its recorded value when its data version is the same, else it is measured on that
validation part too. A refusal leaves the champion where it was and records the reason as the version's
`qfm.promotion` tag (and in promotion.json).

Idempotent: a checkpoint already registered (same SHA-256) is not registered again; its version goes
through the gate again.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from qfm.config import PromoteParams, RunParams, TrackingParams
from qfm.data.manifest import read_manifest
from qfm.errors import DataError
from qfm.registry.gate import Decision, check_metric, decide
from qfm.steps.common import write_json
from qfm.tracking import (
    CHECKPOINT_SHA,
    DATA_VERSION,
    check_reachable,
    data_tags,
    file_sha256,
    flat_params,
    step_run,
    tracking_uri,
)
from qfm.train.checkpoint import model_path

RESULT = "promotion.json"
PROMOTION_TAG = "qfm.promotion"


def promote(model_dir: str | Path, manifest_dir: str | Path, out_dir: str | Path, params: PromoteParams,
            run: RunParams, *, eval_dir: str | Path | None = None, tracking: TrackingParams | None = None,
            workers: int | str = "auto", progress: bool = True) -> dict:
    """Register model_dir/best.safetensors as `params.model_name`, alias it `challenger`, and `champion` if it passes
    the gate; writes out_dir/promotion.json and returns the same dict. MLflow at $MLFLOW_TRACKING_URI, else
    `tracking.uri` (None: the project's SQLite store); the promote run is logged even if tracking.enabled is
    off. The same checkpoint against the same champion is the same promotion: no new version, no new run."""
    import mlflow

    from qfm.registry.versions import CHALLENGER, CHAMPION, current, find_version

    tracking = replace(tracking or TrackingParams(), enabled=True)  # the registry is MLflow: always on here
    check_metric(params.metric)
    checkpoint, uri = model_path(model_dir), tracking_uri(tracking)
    check_reachable(uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    sha = file_sha256(checkpoint)
    existing = find_version(client, params.model_name, CHECKPOINT_SHA, sha)
    champion = current(client, params.model_name, CHAMPION)
    val = _val_metrics(manifest_dir, model_dir, run, workers, progress)
    if params.metric not in val:
        raise DataError(f"validation {params.metric} of {model_dir} could not be computed (got {sorted(val)}); "
                        "choose another promote.metric")
    data = data_tags(manifest_dir, run.split)
    registry_state = {"version": existing and existing.version, "champion": champion and champion.version}
    with step_run("promote", tracking, params=flat_params("promote", params) | flat_params("run", run),
                  inputs={"model_dir": model_dir, "manifest_dir": manifest_dir, "eval_dir": eval_dir},
                  manifest_dir=manifest_dir, split=run.split, dedupe=existing is not None,
                  key_extra=registry_state) as tracker:
        version = existing or _register(client, tracker, checkpoint, sha, params, run, manifest_dir, eval_dir, val,
                                        data)
        client.set_registered_model_alias(params.model_name, CHALLENGER, version.version)
        decision, champion_value = _gate(client, params, run, manifest_dir, version, champion, val[params.metric],
                                         data[DATA_VERSION], workers, progress)
        client.set_model_version_tag(params.model_name, version.version, PROMOTION_TAG, decision.reason)
        if decision.promote:
            client.set_registered_model_alias(params.model_name, CHAMPION, version.version)
        champion_now = version.version if decision.promote else (champion.version if champion else None)
        result = {"model_name": params.model_name, "version": int(version.version),
                  "reused_version": existing is not None,
                  "aliases": [CHALLENGER] + ([CHAMPION] if champion_now == version.version else []),
                  "promoted": decision.promote, "reason": decision.reason, "metric": params.metric,
                  "margin": params.margin, "challenger_val": val[params.metric], "champion_val": champion_value,
                  "previous_champion": int(champion.version) if champion else None,
                  "champion_version": int(champion_now) if champion_now else None,
                  "data_version": data[DATA_VERSION], "model_uri": f"models:/{params.model_name}@{CHAMPION}",
                  "tracking_uri": uri}
        tracker.set_tags({PROMOTION_TAG: decision.reason, "qfm.model_version": version.version})
        tracker.log_metrics({"promoted": float(decision.promote), f"val_{params.metric}": val[params.metric]})
        write_json(Path(out_dir) / RESULT, result)
        tracker.log_artifacts([Path(out_dir) / RESULT])
    return result


def _register(client, tracker, checkpoint: Path, sha: str, params: PromoteParams, run: RunParams, manifest_dir,
              eval_dir, val: dict[str, float], data: dict[str, str]):
    """Log the pyfunc model in the promote run, register it, wait for READY, tag it; no alias yet."""
    import mlflow

    from qfm.registry.pyfunc import log_scorer
    from qfm.registry.versions import wait_ready

    info = log_scorer(checkpoint, _example_image(manifest_dir, run.split))
    registered = mlflow.register_model(info.model_uri, params.model_name, await_registration_for=0,
                                       tags={CHECKPOINT_SHA: sha, "qfm.run_id": tracker.run_id or ""})
    version = wait_ready(client, params.model_name, registered.version)  # a server may register asynchronously
    tags = {DATA_VERSION: data[DATA_VERSION], "qfm.split": run.split, "qfm.metric": params.metric,
            "qfm.dvc_data_hash": data["qfm.dvc_data_hash"], "qfm.train_run_id": _train_run(client, sha)}
    tags |= {f"qfm.val_{k}": str(v) for k, v in val.items()} | _test_tags(eval_dir)
    for key, value in tags.items():
        client.set_model_version_tag(params.model_name, version.version, key, value)
    return version


def _val_metrics(manifest_dir: str | Path, model_dir: str | Path, run: RunParams, workers: int | str,
                 progress: bool) -> dict[str, float]:
    """A model's metrics on the split's validation part (the deterministic multi-crop test of `evaluate`)."""
    from qfm.steps.evaluate import evaluate

    with tempfile.TemporaryDirectory(prefix="qfm-val-") as tmp:
        metrics = evaluate(manifest_dir, model_dir, tmp, run, part="val", workers=workers, progress=progress)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _example_image(manifest_dir: str | Path, split: str) -> Path:
    """One validation image of the split: the registered model's input example."""
    manifest = read_manifest(manifest_dir)
    frame = manifest.frame
    part = frame[frame[split] == "val"] if split in frame.columns else frame
    return manifest.root / str((part if len(part) else frame)["path"].iloc[0])


def _test_tags(eval_dir: str | Path | None) -> dict[str, str]:
    """The evaluate step's test metrics as version tags (shown, never used by the gate)."""
    if eval_dir is None or not (Path(eval_dir) / "metrics.json").is_file():
        return {}
    payload = json.loads((Path(eval_dir) / "metrics.json").read_text())
    return {f"qfm.{payload.get('part', 'test')}_{k}": str(v) for k, v in payload.get("metrics", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _train_run(client, sha: str) -> str:
    """The id of the tracked training run that wrote this checkpoint ('' when it was not tracked)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{CHECKPOINT_SHA}` = '{sha}'",
                              max_results=1) if experiments else []
    return runs[0].info.run_id if runs else ""


def _gate(client, params: PromoteParams, run: RunParams, manifest_dir, version, champion, challenger_value: float,
          data_version: str, workers: int | str, progress: bool):
    """The decision and the champion's value it used (recorded on equal data, else re-measured)."""
    from qfm.registry.versions import version_checkpoint

    if champion is None:
        return decide(params.metric, params.margin, challenger_value, None), None
    if champion.version == version.version:
        return Decision(True, f"kept: version {version.version} is already the champion"), challenger_value
    tags = champion.tags or {}
    recorded = tags.get(f"qfm.val_{params.metric}")
    if tags.get(DATA_VERSION) == data_version and recorded is not None:
        value = float(recorded)
        return decide(params.metric, params.margin, challenger_value, value, champion.version, data_version), value
    with version_checkpoint(client, champion) as checkpoint:
        value = _val_metrics(manifest_dir, checkpoint.parent, run, workers, progress)[params.metric]
    decision = decide(params.metric, params.margin, challenger_value, value, champion.version, data_version)
    return Decision(decision.promote, f"{decision.reason} (champion re-evaluated on this data: it was "
                                      f"registered on data version {tags.get(DATA_VERSION, 'unknown')})"), value
