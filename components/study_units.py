"""study-units: one split's shared units (teacher, DLE pool, SNM bank), each computed once for every row."""

from kfp.dsl import Artifact, Dataset, Input, Output

from components.base import local_manifest, note_summary, qfm_component


@qfm_component
def study_units(manifest: Input[Dataset], dataset: Input[Dataset], plan: Input[Artifact], split: str,
                units: Output[Artifact]) -> list:
    """Train the units of `split` that rows share, each once however many rows ask for it (keyed by its
    fingerprint, qfm.steps.units): the teacher, and the DLE pool and the SNM bank of each setting a row's
    student uses. `units` is the split's unit store. A row whose units fail is recorded, not fatal, as in
    `qfm study`: its error goes to UNIT_FAILURES in `units`, and its study-row records that error instead of
    running (the other rows go on). Returns {"split": split, "row": name} for every row: the items of the
    inner loop (the split travels in each item, not from the outer loop)."""
    import json
    from pathlib import Path

    from qfm.config import load_params
    from qfm.steps.study import (
        UNIT_FAILURES,
        failure_text,
        progress_reporter,
        read_rows,
        row_params,
        shared_units,
    )
    from qfm.steps.units import UnitStore, check_code, device_key

    folder = Path(plan.path)
    rows, _ = read_rows(folder / "rows.yaml")
    params_file = folder / "params.yaml"
    device = device_key(load_params(params_file)["run"].device)
    context = json.loads((folder / "plan.json").read_text())["context"] | {"device": device}
    check_code(context)  # this step's code must be the code the plan keyed the units with
    manifest_dir = local_manifest(manifest.path, dataset.path)
    kept, failed = set(), {}
    with UnitStore(units.path, context) as store:
        for row in rows:
            try:
                shared = shared_units(store, manifest_dir, row_params(params_file, [], row), split,
                                      progress_reporter(split, row.name, True))
            except Exception as exc:  # noqa: BLE001 -- one row failing must not lose the others
                failed[row.name] = failure_text(exc)
                print(f"{split:>9}  {row.name:<16}  FAILED: {failed[row.name].splitlines()[0]}", flush=True)
                continue
            kept |= {unit.path.name for unit in shared.values()}
    (Path(units.path) / UNIT_FAILURES).write_text(json.dumps(failed, indent=2) + "\n")
    note_summary(units, {"split": split, "units": len(kept), "failed_rows": len(failed), "device": device["type"]})
    return [{"split": split, "row": row.name} for row in rows]
