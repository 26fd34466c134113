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

    from qfm.data.validate import REPORT_HTML, REPORT_JSON
    from qfm.steps.validate import validate as run_validate

    work = Path(tempfile.mkdtemp(prefix="qfm-validate-"))
    try:
        result = run_validate(local_manifest(manifest.path, dataset.path), work, load_section("validate", params),
                              tracking=load_section("tracking", tracking), progress=False)
    finally:  # the report is published even when a check failed (the step then fails, naming each failure)
        if (work / REPORT_HTML).is_file():
            shutil.copyfile(work / REPORT_HTML, report.path)
            shutil.copyfile(work / REPORT_JSON, details.path)
        shutil.rmtree(work, ignore_errors=True)
    note_summary(details, {"success": result.success, "n_rows": result.n_rows, **result.counts})
    print(result.summary())
