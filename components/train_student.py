"""train-student (QCC): the deployed student on labels, pseudo-labels and SNM partners (as `qfm train-student`)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import load_section, local_manifest, log_training_metrics, note_summary, qfm_component


@qfm_component
def train_student(manifest: Input[Dataset], dataset: Input[Dataset], teacher: Input[Model], pseudo: Input[Dataset],
                  bank: Input[Dataset], params: str, run: str, tracking: str, model: Output[Model],
                  metrics: Output[Metrics]) -> float:
    """Train the student; `model` holds best.safetensors (epoch chosen on the val part) and its training record. The
    chosen epoch's validation SRCC/PLCC are logged as metrics; returns its validation SRCC (the pipeline's
    promotion gate reads it: registration is decided on validation, never on test)."""
    from qfm.steps.student import train_student as train

    summary = train(local_manifest(manifest.path, dataset.path), model.path, load_section("train_student", params),
                    load_section("run", run), teacher_dir=teacher.path, pseudo_dir=pseudo.path, bank_dir=bank.path,
                    tracking=load_section("tracking", tracking), progress=False)
    log_training_metrics(metrics, summary)
    note_summary(model, summary)
    return float(summary["val"]["srcc"])
