"""study-plan: check a study's rows and splits before anything trains; the plan every later study step reads."""

from kfp.dsl import Artifact, Dataset, Input, Output

from components.base import load_section, local_manifest, note_summary, qfm_component


@qfm_component
def study_plan(manifest: Input[Dataset], dataset: Input[Dataset], rows: str, study_splits: list, run: str,
               train_teacher: str, pseudo_label: str, build_bank: str, train_student: str,
               plan: Output[Artifact]) -> list:
    """Check the rows (JSON of a rows file: {"rows": {NAME: {section.key: value}}, "reference": NAME}), every
    row's parameters and the splits (empty: all of the manifest's). `plan` holds params.yaml (the study's
    sections, under each row's overrides), rows.yaml and plan.json (the splits; the data and code versions
    that key the units, which each later step checks against its own code; the git state of the code).
    Returns the splits: the outer loop of the study pipeline."""
    import json
    import re
    from pathlib import Path

    import yaml

    from qfm.data.manifest import read_manifest
    from qfm.errors import ConfigError
    from qfm.steps.study import parse_rows, row_params, rows_mapping, study_context
    from qfm.steps.units import git_state

    try:
        found, reference = parse_rows(json.loads(rows), "pipeline parameter 'rows'")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"pipeline parameter 'rows' is not JSON ({exc}): pass a rows file's content as JSON, "
                          "e.g. '{\"rows\": {\"baseline\": {}}}' (pipelines.submit --study does this)") from exc
    bad = [r.name for r in found if not re.fullmatch(r"[A-Za-z0-9_.-]+", r.name)]
    if bad:
        raise ConfigError(f"pipeline parameter 'rows': row name(s) {bad} may use only letters, digits, '_', '-' "
                          "and '.' (they name folders and metrics); rename them")
    sections = {"run": run, "train_teacher": train_teacher, "pseudo_label": pseudo_label, "build_bank": build_bank,
                "train_student": train_student}
    folder = Path(plan.path)
    folder.mkdir(parents=True, exist_ok=True)
    params = {}
    for name, text in sections.items():
        load_section(name, text)  # names the pipeline parameter of a bad section
        params[name] = json.loads(text)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for row in found:  # every row's parameters checked before any training starts
        row_params(folder / "params.yaml", [], row)
    manifest_dir = local_manifest(manifest.path, dataset.path)
    columns = read_manifest(manifest_dir).split_columns
    splits = [str(s) for s in study_splits] or columns
    missing = [s for s in splits if s not in columns]
    if missing:
        raise ConfigError(f"pipeline parameter 'study_splits': split(s) {missing} are not in the manifest; it has "
                          f"{columns} (an empty list means all of them)")
    context = study_context(manifest_dir, load_section("run", run).device)
    (folder / "rows.yaml").write_text(yaml.safe_dump(rows_mapping(found, reference), sort_keys=False))
    (folder / "plan.json").write_text(json.dumps({"splits": splits, "rows": [r.name for r in found],
                                                  "reference": reference,
                                                  "context": {k: v for k, v in context.items() if k != "device"},
                                                  "source": git_state()},
                                                 indent=2))
    note_summary(plan, {"rows": len(found), "splits": len(splits), "reference": reference})
    print(f"study: {len(found)} row(s) x {len(splits)} split(s) ({', '.join(splits)}); reference '{reference}'")
    return splits
