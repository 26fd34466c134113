"""study-report: the paired comparison of every row with the reference over the splits (as `qfm study`)."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from components.base import qfm_component


@qfm_component
def study_report(plan: Input[Artifact], splits: Input[list[Dataset]], study: Output[Dataset],
                 report: Output[Markdown], plot: Output[HTML], metrics: Output[Metrics]) -> int:
    """Summarize the study (qfm.steps.study.summarize: medians, paired differences with intervals, Wilcoxon p,
    per-image bootstrap; the best row chosen on validation). `study` holds study.json, study.md,
    study_differences.png and runs/SPLIT/ (each row's result and predictions); `report` is study.md, `plot` the
    plot; `metrics` per row: val/test SRCC medians and, against the reference, the mean test (and val) SRCC
    difference with its headline interval, the corrected resampled t, 95% (`..._diff_ci_corrected_low/high`,
    as study.md and the READMEs quote it; not logged when the splits' part sizes are unknown). Returns the
    number of failed row runs (listed in study.md)."""
    import base64
    import json
    import shutil
    from pathlib import Path

    from qfm.errors import DataError
    from qfm.steps.study import read_rows, row_params, rows_mapping, summarize, write_study

    folder = Path(plan.path)
    rows, reference = read_rows(folder / "rows.yaml")
    planned = json.loads((folder / "plan.json").read_text())
    out = Path(study.path)
    found = {}
    for artifact in splits:
        record = json.loads((Path(artifact.path) / "split.json").read_text())
        shutil.copytree(artifact.path, out / "runs" / record["split"], dirs_exist_ok=True)
        found[record["split"]] = record["rows"]
    missing = [s for s in planned["splits"] if s not in found]
    if missing:
        raise DataError(f"no results for split(s) {missing} of the plan {planned['splits']}")
    per_split = {s: found[s] for s in planned["splits"]}
    for split, results in per_split.items():  # absolute while summarizing, relative to `study` in study.json
        for result in results.values():
            if "predictions" in result:
                result["predictions"] = str(out / "runs" / split / result["predictions"])
    params = {row.name: row_params(folder / "params.yaml", [], row) for row in rows}
    summary = summarize(rows, reference, per_split, params)
    for split, results in per_split.items():
        for result in results.values():
            if "predictions" in result:
                result["predictions"] = str(Path(result["predictions"]).relative_to(out))
    summary |= {"context": planned["context"], "source": planned.get("source"), "splits": planned["splits"],
                "command": {"pipeline": "qfm-study", "rows": rows_mapping(rows, reference),
                            "params": (folder / "params.yaml").read_text()}}
    write_study(out, summary)
    shutil.copyfile(out / "study.md", report.path)
    image = base64.b64encode((out / "study_differences.png").read_bytes()).decode()
    Path(plot.path).write_text(
        f"<html><body><h3>Paired differences of test SRCC with '{reference}', same splits</h3>"
        f"<img alt=\"paired differences\" src=\"data:image/png;base64,{image}\"/></body></html>\n")
    failed = sum(len(e["errors"]) for e in summary["rows"])
    for entry in summary["rows"]:
        name = entry["row"]
        for key in ("val_srcc", "test_srcc"):
            if entry[key]["median"] is not None:
                metrics.log_metric(f"{name}_{key}_median", entry[key]["median"])
        for key in ("test_srcc", "val_srcc"):
            diff = entry.get("vs_reference", {}).get(key)
            if diff and diff["n"]:
                metrics.log_metric(f"{name}_{key}_diff_mean", diff["mean"])
                interval = diff.get("ci_corrected")
                if interval is not None:
                    metrics.log_metric(f"{name}_{key}_diff_ci_corrected_low", interval[0])
                    metrics.log_metric(f"{name}_{key}_diff_ci_corrected_high", interval[1])
    metrics.log_metric("failed_runs", failed)
    study.metadata["best_row_by_val"] = summary["best_row_by_val"] or ""
    study.metadata["reference"] = reference
    print((out / "study.md").read_text())
    return failed
