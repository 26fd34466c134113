"""Registered model versions and aliases: register and wait for READY, resolve `models:/NAME@ALIAS` (or
`models:/NAME/VERSION`) with clear errors, and fetch a version's checkpoint."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from qfm.errors import QfmError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

READY, FAILED = "READY", "FAILED_REGISTRATION"
CHAMPION, CHALLENGER = "champion", "challenger"
URI_PATTERN = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of models:/NAME@ALIAS or models:/NAME/VERSION."""
    match = URI_PATTERN.match(uri)
    if not match:
        raise QfmError(f"'{uri}' is not a registered-model URI: use models:/NAME@ALIAS (e.g. "
                       "models:/qfm-iqm@champion) or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def resolve_version(client: MlflowClient, name: str, alias: str | None = None,
                    version: str | None = None) -> ModelVersion:
    """The ModelVersion an alias (or a version number) names; unknown names, aliases and versions are
    QfmErrors that list what exists at the tracking URI."""
    from mlflow.exceptions import MlflowException

    where = client.tracking_uri
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise QfmError(f"cannot read registered model '{name}' at {where}: {exc}") from exc
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise QfmError(f"no registered model '{name}' at {where}; registered models: {known or 'none'} "
                       "(run `qfm promote` to register one, or check MLFLOW_TRACKING_URI)") from None
    if alias is not None:
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            listed = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise QfmError(f"model '{name}' has no alias '{alias}' at {where}; its aliases: {listed}")
        version = aliases[alias]
    try:
        found = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise QfmError(f"model '{name}' has no version {version} at {where}") from exc
    if found.status != READY:
        raise QfmError(f"model '{name}' version {found.version} is {found.status}, not READY")
    return found


def wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 300.0) -> ModelVersion:
    """Poll until the version is READY; a FAILED_REGISTRATION or a timeout is a QfmError."""
    deadline = time.monotonic() + timeout
    while True:
        found = client.get_model_version(name, version)
        if found.status == READY:
            return found
        if found.status == FAILED or time.monotonic() > deadline:
            raise QfmError(f"model '{name}' version {version} did not become READY ({found.status}: "
                           f"{found.status_message or 'no message'}); no alias was set")
        time.sleep(0.25)


def find_version(client: MlflowClient, name: str, tag: str, value: str) -> ModelVersion | None:
    """A READY version of the model whose tag equals value (e.g. the checkpoint's SHA-256), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise
    ready = [v for v in versions if v.status == READY]
    return min(ready, key=lambda v: int(v.version)) if ready else None


def current(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version an alias names now, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _not_found(exc) or "alias" in str(exc).lower():
            return None
        raise


@contextmanager
def version_checkpoint(client: MlflowClient, version: ModelVersion) -> Iterator[Path]:
    """The version's best.safetensors, downloaded into a temporary folder that lives for the with-block."""
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="qfm-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=tmp,
            tracking_uri=getattr(client, "tracking_uri", None)))
        artifacts = Model.load(local / "MLmodel").flavors["python_function"].get("artifacts", {})
        if "checkpoint" not in artifacts:
            raise QfmError(f"model '{version.name}' version {version.version} is not a qfm model (no checkpoint)")
        yield local / artifacts["checkpoint"]["path"] / "best.safetensors"


@contextmanager
def checkpoint_from_uri(uri: str, tracking_uri: str) -> Iterator[Path]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` at the tracking URI -> a local best.safetensors (temporary)."""
    from qfm.tracking import check_reachable

    name, alias, number = parse_model_uri(uri)
    check_reachable(tracking_uri)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    with version_checkpoint(client, resolve_version(client, name, alias, number)) as path:
        yield path
