"""MLflow tracking of the pipeline steps, behind one context manager (`step_run`) and one decorator
(`tracked`) built on it. MLflow is imported only when tracking is on, so the library runs without it.

A step's run holds: its parameters (`section.key`), per-epoch metrics (from the fit loop's `on_epoch`),
the numbers of its summary as final metrics, its small output files as artifacts, its checkpoints as
`file://` URIs with their SHA-256 (or the files, with `tracking.log_checkpoints`), and tags: the git
commit, the DVC data hash of the dataset root, the data version, the split and its protocol, and
`qfm.pipeline_run`, shared by the stages of one pipeline run.

Idempotency: a run is keyed by a hash of the step, its parameters, the fingerprints of its inputs, the
data version and the git commit (`qfm.run_key`). If a FINISHED run with that key exists, the step still
runs (DVC decides what runs) but nothing new is logged: no duplicate FINISHED runs.

Failure: an unreachable tracking server is a QfmError naming the URI before any run starts; a step that
raises ends its run FAILED (KILLED on Ctrl-C) with the error in the tag `qfm.error`, never RUNNING.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from qfm.config import TrackingParams
from qfm.errors import QfmError

RUN_KEY, PIPELINE_RUN, STEP = "qfm.run_key", "qfm.pipeline_run", "qfm.step"
DATA_VERSION, DVC_DATA_HASH, CHECKPOINT_SHA = "qfm.data_version", "qfm.dvc_data_hash", "qfm.checkpoint_sha256"
PIPELINE_ENV = "QFM_PIPELINE_RUN"
COMMIT_ENV = "QFM_GIT_COMMIT"          # where there is no git checkout (a container image)
MAX_PARAM = 6000                       # MLflow's limit on a parameter value
LOCAL_SCHEMES = ("sqlite", "file", "postgresql", "mysql", "mssql", "")
TRAINING_OUTPUTS = ("summary.json", "history.json", "training_curves.png")


def tracking_uri(params: TrackingParams) -> str:
    """$MLFLOW_TRACKING_URI when set (a team's server), else `tracking.uri` (the project's SQLite file)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.uri


def project_root() -> Path:
    """The DVC project (DVC sets $DVC_ROOT for its stages), else the working folder."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking URI must answer (any HTTP status: auth is MLflow's business) a GET /health within
    the timeout; otherwise a QfmError naming it, and no run is made."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise QfmError(f"MLflow tracking server {uri} is not reachable ({reason}). Start it, point "
                       "MLFLOW_TRACKING_URI at a running one, or set tracking.enabled: false") from None


def _client(uri: str):
    """An MlflowClient for the URI; MLflow's HTTP retries are shortened (unless set) so a dead server
    fails a step in seconds rather than minutes."""
    import mlflow

    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")):
        os.environ.setdefault(name, value)
    check_reachable(uri)
    return mlflow.MlflowClient(uri)


@contextmanager
def _global_uri(uri: str) -> Iterator[None]:
    """MLflow's global URI for the fluent calls (start_run, log_model, register_model) during one step, put
    back afterwards, and $MLFLOW_TRACKING_URI too (mlflow.set_tracking_uri exports it): so that the next step
    in this process, or a caller relying on MLflow's own settings, is not sent to this step's store."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # restores the previous global URI

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def experiment_id(client, params: TrackingParams, uri: str) -> str:
    """The experiment's id, created on first use. A local store keeps its artifacts in `tracking.artifacts`:
    a folder, or a URI (e.g. s3://bucket/mlflow, with MLFLOW_S3_ENDPOINT_URL for an S3-compatible store)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(params.experiment)
    if found is not None:
        return found.experiment_id
    scheme = uri.split(":", 1)[0] if "://" in uri or uri.startswith("sqlite:") else ""
    location = None
    if scheme.split("+")[0] in LOCAL_SCHEMES:
        artifacts = str(params.artifacts)
        location = artifacts if "://" in artifacts else Path(artifacts).resolve().as_uri()
    try:
        return client.create_experiment(params.experiment, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent step
        return client.get_experiment_by_name(params.experiment).experiment_id


# ---------------------------------------------------------------- versions, hashes, fingerprints

@functools.cache
def git_commit(where: str = ".") -> tuple[str, bool]:
    """(commit, dirty) of the checkout holding `where`; ($QFM_GIT_COMMIT or 'unknown', False) outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(COMMIT_ENV, "unknown"), False
    return commit, dirty


def file_sha256(path: Path) -> str:
    """A file's SHA-256; a checkpoint's `.sha256` sidecar is trusted (loading re-checks it)."""
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fingerprint(path: str | Path | None) -> str:
    """A content hash of a step input (a file, or every file below a folder); 'none' / 'absent' otherwise."""
    if path is None:
        return "none"
    path = Path(path)
    if not path.exists():
        return "absent"
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{item.relative_to(path).as_posix()}\0{file_sha256(item)}\n".encode())
    return digest.hexdigest()


def dvc_data_hash(root: str | Path, project: Path | None = None) -> str | None:
    """The md5 DVC recorded for the dataset root or the tracked folder holding it (a `.dvc` file such as
    data.dvc, or an output in dvc.lock); None when DVC does not track it. Reads YAML only, no dvc import."""
    project = (project or project_root()).resolve()
    try:
        rel = Path(root).resolve().relative_to(project)
    except ValueError:
        return None
    candidates = [rel, *list(rel.parents)[:-1]]
    for folder in candidates:
        dvc_file = project / f"{folder.as_posix()}.dvc"
        if dvc_file.is_file():
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
            if outs[0].get("md5"):
                return f"{outs[0]['md5']} ({dvc_file.name})"
    lock = project / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
        for name, stage in stages.items():
            for out in stage.get("outs") or []:
                if Path(out.get("path", "")) in candidates and out.get("md5"):
                    return f"{out['md5']} (dvc.lock: {name})"
    return None


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def data_tags(manifest_dir: str | Path | None = None, split: str | None = None,
              data_root: str | Path | None = None) -> dict[str, str]:
    """Tags naming the data a step used. `qfm.data_version` hashes the DVC md5 of the dataset root (when DVC
    tracks it), the manifest's rows (ids, paths, scores, content, the split column) and each image's size;
    with no manifest (ingest) the files under the root. Promotion compares models on equal versions."""
    import pandas as pd

    from qfm.data.manifest import read_manifest

    tags: dict[str, str] = {}
    if manifest_dir is not None:
        manifest = read_manifest(manifest_dir)
        root, frame = manifest.root, manifest.frame
        columns = ["image_id", "path", "mos", "content_id"] + ([split] if split in frame.columns else [])
        rows = hashlib.sha256(pd.util.hash_pandas_object(frame[columns], index=False).to_numpy().tobytes())
        files = [(p, _size(root / p)) for p in frame["path"].astype(str)]
        protocol = {k: v for k, v in manifest.meta.get("splits", {}).items() if k != "columns"}
        tags |= {"qfm.dataset": str(manifest.meta.get("dataset", "")), "qfm.manifest_rows": rows.hexdigest()[:16],
                 "qfm.split_protocol": json.dumps(protocol, sort_keys=True)}
    else:
        root = Path(data_root) if data_root is not None else None
        files = ([(p.relative_to(root).as_posix(), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()]
                 if root is not None and root.is_dir() else [])
        rows = None
    dvc_hash = dvc_data_hash(root) if root is not None else None
    tags |= {DVC_DATA_HASH: dvc_hash or "untracked", "qfm.data_root": str(Path(root).resolve()) if root else ""}
    if split:
        tags["qfm.split"] = split
    version = _digest((dvc_hash or "").split(" ")[0], rows.hexdigest() if rows else None, files)
    tags[DATA_VERSION] = version[:16]
    return tags


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def pipeline_run_id(sections: Mapping[str, Any]) -> str:
    """$QFM_PIPELINE_RUN, else an id of the git commit and every parameter (tracking aside): the stages run
    from one code version and one params.yaml share it."""
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    plain = {k: dataclasses.asdict(v) for k, v in sections.items() if k != "tracking" and dataclasses.is_dataclass(v)}
    return "cfg-" + _digest(git_commit(str(project_root()))[0], plain)[:12]


def flat_params(prefix: str, value: Any) -> dict[str, str]:
    """A dataclass or mapping as {prefix.key: text} (nested mappings as JSON), for MLflow parameters."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        return {prefix: _text(value)}
    return {f"{prefix}.{k}": _text(v) for k, v in value.items()}


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM else text[:MAX_PARAM - 14] + "...(truncated)"


def numbers(data: Mapping, prefix: str = "") -> dict[str, float]:
    """The finite numeric leaves of a (nested) summary, keys joined with '_' (booleans, None, NaN out)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= numbers(value, f"{name}_")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[name] = float(value)
    return out


# ---------------------------------------------------------------- the run a step logs into

class StepRun:
    """What a step logs into. Inactive (every call a no-op) when tracking is off or the identical run exists."""

    def __init__(self, client=None, run_id: str | None = None, *, log_checkpoints: bool = False,
                 reused: str | None = None) -> None:
        self.client, self.run_id, self.reused = client, run_id, reused
        self.log_checkpoints = log_checkpoints

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: Mapping[str, str]) -> None:
        if self.active and params:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if self.active and metrics:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_epoch(self, record: Mapping) -> None:
        """The fit loop's `on_epoch` callback: every number of the epoch's record, at step = epoch."""
        self.log_metrics({k: v for k, v in numbers(record).items() if k != "epoch"}, step=int(record["epoch"]))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active and tags:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, _text(v)) for k, v in tags.items()])

    def log_artifacts(self, paths: Iterable[str | Path], folder: str | None = None) -> None:
        """Files (or folders) that exist; a missing one is simply not there to log."""
        if not self.active:
            return
        for path in map(Path, paths):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), folder)
            elif path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), folder or path.name)

    def log_checkpoint(self, path: str | Path) -> None:
        """A checkpoint's file:// URI and SHA-256 as tags, or the file itself with tracking.log_checkpoints."""
        path = Path(path)
        if not self.active or not path.is_file():
            return
        tags = {f"qfm.checkpoint.{path.name}": path.resolve().as_uri()}
        if path.name == "best.safetensors":
            tags[CHECKPOINT_SHA] = file_sha256(path)
        self.set_tags(tags)
        if self.log_checkpoints:
            self.log_artifacts([path, path.with_name(path.name + ".sha256")], "checkpoints")


def find_finished(client, experiment: str, run_key: str) -> str | None:
    """The id of a FINISHED run of the experiment with this run key, if any."""
    runs = client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY}` = '{run_key}' and "
                              "attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


@contextmanager
def step_run(step: str, tracking: TrackingParams | None, *, params: Mapping[str, str] | None = None,
             inputs: Mapping[str, str | Path | None] | None = None, manifest_dir: str | Path | None = None,
             data_root: str | Path | None = None, split: str | None = None, dedupe: bool = True,
             key_extra: Mapping[str, Any] | None = None) -> Iterator[StepRun]:
    """One MLflow run around a step (see the module docstring); yields an inactive StepRun when tracking
    is off, or when `dedupe` finds a FINISHED run with the same key (`key_extra`: more that the key must
    hold, such as the registry state a promotion starts from)."""
    if tracking is None or not tracking.enabled:
        yield StepRun()
        return
    uri = tracking_uri(tracking)
    with _global_uri(uri), _run(step, tracking, uri, params=dict(params or {}), inputs=inputs or {},
                                tags=data_tags(manifest_dir, split, data_root), split=split, dedupe=dedupe,
                                key_extra=key_extra or {}) as tracker:
        yield tracker


@contextmanager
def _run(step: str, tracking: TrackingParams, uri: str, *, params: dict[str, str], inputs: Mapping, tags: dict,
         split: str | None, dedupe: bool, key_extra: Mapping) -> Iterator[StepRun]:
    import mlflow

    commit, dirty = git_commit(str(project_root()))
    key = _digest(step, params, {k: fingerprint(v) for k, v in inputs.items()}, tags[DATA_VERSION], commit,
                  dict(key_extra))
    tags |= {STEP: step, RUN_KEY: key, PIPELINE_RUN: tracking.pipeline_run or os.environ.get(PIPELINE_ENV)
             or f"adhoc-{uuid.uuid4().hex[:8]}", "qfm.git_commit": commit, "qfm.git_dirty": str(dirty).lower(),
             "mlflow.source.git.commit": commit}
    tags |= {f"qfm.input.{k}": str(v) for k, v in inputs.items() if v is not None}
    if os.environ.get("DVC_STAGE"):
        tags["qfm.dvc_stage"] = os.environ["DVC_STAGE"]
    try:
        client = _client(uri)
        exp = experiment_id(client, tracking, uri)
        reused = find_finished(client, exp, key) if dedupe else None
        run = None if reused else mlflow.start_run(experiment_id=exp, run_name=f"{step} {split or ''}".strip(),
                                                   tags=tags, nested=mlflow.active_run() is not None)
    except QfmError:
        raise
    except Exception as exc:  # MlflowException, a refused connection after retries, a locked database
        raise QfmError(f"MLflow tracking at {uri} failed before {step} started: {exc}") from exc
    if run is None:
        print(f"tracking: {step} with these inputs and parameters is already recorded as run {reused} "
              f"({uri}); not logged again", file=sys.stderr)
        yield StepRun(reused=reused)
        return
    tracker = StepRun(client, run.info.run_id, log_checkpoints=tracking.log_checkpoints)
    try:
        tracker.log_params(params)
        yield tracker
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        _close(client, run.info.run_id, status, f"{type(exc).__name__}: {exc}")
        raise
    _close(client, run.info.run_id, "FINISHED")


def _close(client, run_id: str, status: str, error: str | None = None) -> None:
    """End the run (and pop it from MLflow's active-run stack); on a failure path, never mask the error."""
    import mlflow

    try:
        if error:
            client.set_tag(run_id, "qfm.error", _text(error))
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            client.set_terminated(run_id, status)
    except Exception as exc:  # the server went away mid-step
        if error is None:
            raise QfmError(f"the step finished but its MLflow run {run_id} could not be closed ({exc})") from exc
        print(f"tracking: could not mark run {run_id} {status} ({exc})", file=sys.stderr)


def tracked(step: str, *, inputs: tuple[str, ...], params: tuple[str, ...] = ("params", "run"),
            outputs: tuple[str, ...] = (), checkpoints: tuple[str, ...] = ()) -> Callable:
    """Decorate a step function `f(manifest_dir, ..., out_dir, params, run, ..., on_epoch=None)`: it gains a
    keyword `tracking: TrackingParams | None`; with tracking on, the call runs inside `step_run`.

    inputs: argument names holding input paths (hashed for the run key); params: argument names logged as
    parameters ('params' under the step's name, others under their own); outputs / checkpoints: files of
    out_dir logged as artifacts / as checkpoint URIs. The step's returned dict gives the final metrics (named
    `summary_*` for training steps, whose per-epoch series use the plain names).
    """
    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, tracking: TrackingParams | None = None, **kwargs):
            if tracking is None or not tracking.enabled or os.environ.get("RANK", "0") != "0":
                return fn(*args, **kwargs)  # under torchrun only rank 0 (RANK 0) tracks the step
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            logged: dict[str, str] = {}
            for name in params:
                logged |= flat_params(step if name == "params" else name, arguments[name])
            run = arguments.get("run")
            with step_run(step, tracking, params=logged, inputs={n: arguments[n] for n in inputs},
                          manifest_dir=arguments.get("manifest_dir"), split=getattr(run, "split", None)) as tr:
                if "on_epoch" in arguments:
                    arguments["on_epoch"] = _chain(arguments["on_epoch"], tr.log_epoch)
                result = fn(*bound.args, **bound.kwargs)
                out_dir = Path(arguments["out_dir"])
                prefix = "summary_" if "on_epoch" in arguments else ""  # apart from the per-epoch series
                tr.log_metrics(numbers(result, prefix) if isinstance(result, Mapping) else {})
                tr.log_artifacts([out_dir / name for name in outputs])
                for name in checkpoints:
                    tr.log_checkpoint(out_dir / name)
            return result

        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), inspect.Parameter(
            "tracking", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="TrackingParams | None")])
        return wrapper
    return wrap


def _chain(first: Callable | None, second: Callable) -> Callable:
    if first is None:
        return second

    def both(record):
        first(record)
        second(record)
    return both
