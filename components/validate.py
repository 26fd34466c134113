"""validate: the great-expectations suite on the manifest and its images (as `qfm validate`)."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from components.base import load_section, local_manifest, note_summary, qfm_component


@qfm_component
def validate(manifest: Input[Dataset], dataset: Input[Dataset], params: str, tracking: str, report: Output[HTML],
             details: Output[Artifact]):
    """Run the suite; the HTML report goes to `report`, every check's result (JSON) to `details`. A failed
    check fails the step with each failure named (so nothing downstream trains on bad data)."""
    import shutil
    import tempfile
    from pathlib import Path

    from qfm.data.manifest import read_manifest
    from qfm.data.validate import REPORT_HTML, REPORT_JSON, raise_if_failed, validate_manifest
    from qfm.tracking import step_run

    limits = load_section("validate", params)
    local = local_manifest(manifest.path, dataset.path)
    work = Path(tempfile.mkdtemp(prefix="qfm-validate-"))
    with step_run("validate", load_section("tracking", tracking),
                  params={"validate.min_width": str(limits.min_width), "validate.min_height": str(limits.min_height)},
                  inputs={"manifest": local}, manifest_dir=local) as run:
        result = validate_manifest(read_manifest(local), min_width=limits.min_width, min_height=limits.min_height,
                                   report_dir=work, progress=False)
        shutil.copyfile(work / REPORT_HTML, report.path)
        shutil.copyfile(work / REPORT_JSON, details.path)
        note_summary(details, {"success": result.success, "n_rows": result.n_rows, **result.counts})
        run.log_metrics({"success": float(result.success)} | {f"checks_{k}": v for k, v in result.counts.items()})
        run.log_artifacts([work / REPORT_JSON, work / REPORT_HTML])
        raise_if_failed(result, work)
    print(result.summary())
