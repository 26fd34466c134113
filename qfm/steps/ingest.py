"""ingest: a dataset release (or any CSV) -> the normalised manifest with its splits, tracked as one run."""

from __future__ import annotations

from pathlib import Path

from qfm.config import TrackingParams
from qfm.data.adapters import read_dataset
from qfm.data.manifest import Manifest, build_manifest, write_manifest
from qfm.data.splits import SplitProtocol
from qfm.errors import ConfigError
from qfm.tracking import flat_params, step_run

REPORT_FILE = "ingest_report.json"


def ingest(fmt: str, root: str | Path, out_dir: str | Path, protocol: SplitProtocol, *, options: dict | None = None,
           skip_invalid: bool = False, tracking: TrackingParams | None = None, root_label: str | None = None,
           progress: bool = True) -> Manifest:
    """Read `root` with the adapter `fmt`, check every row and image, write manifest.parquet and
    ingest_report.json into out_dir. `root_label` is how the root is logged (e.g. the URI it came from)."""
    options = dict(options or {})
    try:
        raw = read_dataset(fmt, root, **options)
    except TypeError as exc:  # an option the adapter does not take
        raise ConfigError(f"ingest.options: format '{fmt}' does not take that option: {exc}") from exc
    logged = {"ingest.format": fmt, "ingest.root": root_label or str(root), "ingest.options": options,
              "ingest.skip_invalid": skip_invalid}
    with step_run("ingest", tracking, params=logged | flat_params("splits", protocol),
                  data_root=root) as run:
        manifest = build_manifest(raw, protocol, skip_invalid=skip_invalid, progress=progress)
        write_manifest(manifest, out_dir)
        run.log_metrics({"n_images": manifest.meta["n_images"], "n_skipped": manifest.meta["n_skipped"]})
        run.log_artifacts([Path(out_dir) / REPORT_FILE])
    return manifest
