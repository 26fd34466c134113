"""study-row: one row's student on one split, on top of the split's shared units, and its test evaluation."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.base import local_manifest, note_summary, qfm_component


@qfm_component
def study_row(manifest: Input[Dataset], dataset: Input[Dataset], plan: Input[Artifact], units: Input[Artifact],
              split: str, row: str, result: Output[Dataset], metrics: Output[Metrics]):
    """Train `row`'s model on `split`, reusing the split's shared units as they are, and test it. `result`
    holds row.json (the row's units, validation and test figures, or its error) and predictions.csv (the
    student's weights are not kept: the study compares settings, qfm-iqm makes the model to deploy); the
    figures are logged as metrics. A row that fails is recorded, not fatal, as in `qfm study` (a row whose
    shared units failed in study-units gets that error, without a second try)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from qfm.config import load_params
    from qfm.errors import ConfigError
    from qfm.steps.study import UNIT_FAILURES, read_rows, run_row_safely
    from qfm.steps.units import MARKER, UnitStore, check_code, device_key

    folder = Path(plan.path)
    rows, _ = read_rows(folder / "rows.yaml")
    chosen = [r for r in rows if r.name == row]
    if not chosen:
        raise ConfigError(f"parameter 'row': '{row}' is not one of the study's rows {[r.name for r in rows]}")
    params_file = folder / "params.yaml"
    device = device_key(load_params(params_file)["run"].device)
    context = json.loads((folder / "plan.json").read_text())["context"] | {"device": device}
    check_code(context)  # this step's code must be the code the plan keyed the units with
    out = Path(result.path)
    out.mkdir(parents=True, exist_ok=True)
    failures = Path(units.path) / UNIT_FAILURES
    unit_error = json.loads(failures.read_text()).get(row) if failures.is_file() else None
    with tempfile.TemporaryDirectory(prefix="qfm-units-") as work:  # the row's own units; only its results are kept
        for unit in Path(units.path).iterdir():  # the split's finished units, read in place
            if (unit / MARKER).is_file():
                (Path(work) / unit.name).symlink_to(unit.resolve(), target_is_directory=True)
        if unit_error is not None:  # study-units could not make this row's shared units: the same error, not a rerun
            outcome = {"error": unit_error}
            print(f"{split:>9}  {row:<16}  FAILED in study-units: {unit_error.splitlines()[0]}", flush=True)
        else:
            with UnitStore(work, context) as store:
                outcome = run_row_safely(store, local_manifest(manifest.path, dataset.path), str(params_file), [],
                                         chosen[0], split, progress=True)
        if "predictions" in outcome:
            shutil.copyfile(outcome["predictions"], out / "predictions.csv")
            outcome["predictions"] = "predictions.csv"
    (out / "row.json").write_text(json.dumps({"split": split, "row": row, "result": outcome}, indent=2))
    failed = "error" in outcome
    note_summary(result, {"split": split, "row": row, "failed": failed})
    if not failed:
        for part, metric in (("val", "srcc"), ("val", "plcc_raw"), ("test", "srcc"), ("test", "plcc_raw"),
                             ("test", "plcc_logistic")):
            value = outcome[part].get(metric)
            if isinstance(value, (int, float)):
                metrics.log_metric(f"{part}_{metric}", value)
        metrics.log_metric("best_epoch", outcome["best_epoch"])
    metrics.log_metric("failed", int(failed))
