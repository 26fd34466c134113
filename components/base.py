"""What every qfm Kubeflow component shares: the image, the decorator and three small helpers.

The helpers are embedded into each component's source (kfp ``additional_funcs``), so a component needs
nothing in its image beyond the installed ``qfm`` package. Keep them self-contained: imports inside,
builtin type hints only.
"""

from kfp import dsl

# The project image (see the Dockerfile). The pipeline overrides it per task with its `image` parameter.
DEFAULT_IMAGE = "qfm:0.1.0-cuda"


def load_section(name: str, text: str):
    """One params.yaml section, passed as a JSON object in a string parameter, checked by qfm's schema.

    JSON text rather than a dict parameter: KFP carries dict parameters as protobuf Structs, which turn
    every integer into a float (epochs: 4 -> 4.0), and the schema rightly refuses a float for an int.
    """
    import json

    from qfm.config import parse_section
    from qfm.errors import ConfigError

    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"pipeline parameter '{name}' is not a JSON object ({exc}): pass the params.yaml "
                          f"section '{name}' as JSON, e.g. '{{\"seed\": 0}}' (pipelines.submit does this)") from exc
    return parse_section(name, data, source=f"pipeline parameter '{name}'")


def local_manifest(manifest_dir: str, dataset_dir: str) -> str:
    """A copy of the manifest whose dataset root is the Dataset artifact's local path in this container.

    The manifest records its root relative to where it was written; artifacts land at other paths in each
    step's container, so every step that reads images re-roots a copy (a small Parquet file) first. The copy
    is removed when the step's process ends (under kfp.local's SubprocessRunner, steps share the host's /tmp).
    """
    import atexit
    import shutil
    import tempfile

    from qfm.data.manifest import read_manifest, write_manifest

    work = tempfile.mkdtemp(prefix="qfm-manifest-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    write_manifest(read_manifest(manifest_dir, root=dataset_dir), work)
    return work


def note_summary(artifact, summary: dict) -> None:
    """Copy a step summary's scalar values into the artifact's metadata (shown in the KFP UI)."""
    for key, value in summary.items():
        if isinstance(value, (str, int, float, bool)):
            artifact.metadata[key] = value


def log_training_metrics(metrics, summary: dict) -> None:
    """The chosen epoch's validation figures (val_srcc, val_plcc_raw, ...) and the epoch, for the KFP UI."""
    for key, value in summary["val"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(f"val_{key}", value)
    metrics.log_metric("best_epoch", summary["best_epoch"])


def qfm_component(func):
    """@dsl.component on the project image: a lightweight Python component, the one kind that runs both on
    a cluster and under kfp.local's SubprocessRunner; kfp comes from the image, the helpers are embedded."""
    return dsl.component(func, base_image=DEFAULT_IMAGE, install_kfp_package=False,
                         additional_funcs=[load_section, local_manifest, note_summary,
                                           log_training_metrics])
