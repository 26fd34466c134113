"""train-teacher: the plain DEIQT recipe on the split's train part (as `qfm train-teacher`)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import load_section, local_manifest, log_training_metrics, note_summary, qfm_component


@qfm_component
def train_teacher(manifest: Input[Dataset], dataset: Input[Dataset], params: str, run: str, tracking: str,
                  model: Output[Model], metrics: Output[Metrics]):
    """Train the teacher; `model` holds best.safetensors (epoch chosen on the val part), last.safetensors, history.json,
    training_curves.png, summary.json. The chosen epoch's validation SRCC/PLCC are logged as metrics."""
    from qfm.steps.teacher import train_teacher as train

    summary = train(local_manifest(manifest.path, dataset.path), model.path, load_section("train_teacher", params),
                    load_section("run", run),
                    tracking=load_section("tracking", tracking), progress=False)
    log_training_metrics(metrics, summary)
    note_summary(model, summary)
