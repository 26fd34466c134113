"""validate: the great-expectations suite on a manifest and its images, tracked as one run; a failed check
raises (naming each failure) after the report is written and logged."""

from __future__ import annotations

from pathlib import Path

from qfm.config import TrackingParams, ValidateParams
from qfm.data.manifest import read_manifest
from qfm.data.validate import REPORT_HTML, REPORT_JSON, ValidationResult, raise_if_failed, validate_manifest
from qfm.tracking import step_run


def validate(manifest_dir: str | Path, report_dir: str | Path, params: ValidateParams, *,
             tracking: TrackingParams | None = None, progress: bool = True) -> ValidationResult:
    """Write validation.json and validation.html into report_dir; raise DataError if any check failed."""
    report_dir = Path(report_dir)
    with step_run("validate", tracking,
                  params={"validate.min_width": str(params.min_width), "validate.min_height": str(params.min_height)},
                  inputs={"manifest": str(manifest_dir)}, manifest_dir=manifest_dir) as run:
        result = validate_manifest(read_manifest(manifest_dir), min_width=params.min_width,
                                   min_height=params.min_height, report_dir=report_dir, progress=progress)
        run.log_metrics({"success": float(result.success)} | {f"checks_{k}": v for k, v in result.counts.items()})
        run.log_artifacts([report_dir / REPORT_JSON, report_dir / REPORT_HTML])
        raise_if_failed(result, report_dir)
    return result
