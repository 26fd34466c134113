"""pseudo-label (DLE): the frozen teacher scores the unlabelled pool (as `qfm pseudo-label`)."""

from kfp.dsl import Dataset, Input, Model, Output

from components.base import load_section, local_manifest, note_summary, qfm_component


@qfm_component
def pseudo_label(manifest: Input[Dataset], dataset: Input[Dataset], teacher: Input[Model], params: str, run: str,
                 tracking: str, pseudo: Output[Dataset]):
    """Write pseudo_labels.parquet and summary.json (with `pool: synthetic` also pool/) into `pseudo`."""
    from qfm.steps.pseudo_label import pseudo_label as label

    summary = label(local_manifest(manifest.path, dataset.path), teacher.path, pseudo.path,
                    load_section("pseudo_label", params), load_section("run", run),
                    tracking=load_section("tracking", tracking), progress=False)
    note_summary(pseudo, summary)
