"""evaluate: deterministic multi-crop test of the student on the split's test part (as `qfm evaluate`)."""

from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components.base import load_section, local_manifest, note_summary, qfm_component


@qfm_component
def evaluate(manifest: Input[Dataset], dataset: Input[Dataset], model: Input[Model], run: str, tracking: str,
             results: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown]) -> float:
    """Write metrics.json, predictions.csv and scatter.png into `results`; log SRCC, KRCC, PLCC (raw and
    logistic-fitted) and RMSE as metrics; a Markdown report; return the test SRCC (reported only: the
    promotion gate reads the student's validation SRCC)."""
    from qfm.steps.evaluate import evaluate as test

    settings = load_section("run", run)
    m = test(local_manifest(manifest.path, dataset.path), model.path, results.path, settings,
             tracking=load_section("tracking", tracking), progress=False)
    for key in ("srcc", "krcc", "plcc_raw", "plcc_logistic", "rmse_raw", "rmse_logistic"):
        if m[key] is not None:
            metrics.log_metric(key, m[key])
    metrics.log_metric("n", m["n"])
    note_summary(results, {"split": settings.split, "part": "test", **m})
    rows = "\n".join(f"| {label} | {'n/a (fit failed)' if m[key] is None else format(m[key], '.4f')} |"
                     for label, key in (("SRCC", "srcc"), ("KRCC", "krcc"), ("PLCC raw", "plcc_raw"),
                                        ("PLCC logistic-fitted", "plcc_logistic"), ("RMSE raw", "rmse_raw")))
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(f"# Evaluation on {settings.split}, test part ({m['n']} images)\n\n| metric | value |\n| --- | --- |\n"
                f"{rows}\n\nThe model's epoch was chosen on the validation part, never on test. PLCC is reported "
                "raw and after the 4-parameter logistic fit. Predictions, metrics.json and the scatter plot are "
                "in the `results` artifact.\n")
    return m["srcc"]
