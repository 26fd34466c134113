"""build-bank (SNM): teacher embeddings, faiss index, noise-partner mining (as `qfm build-bank`)."""

from kfp.dsl import Dataset, Input, Model, Output

from components.base import load_section, local_manifest, note_summary, qfm_component


@qfm_component
def build_bank(manifest: Input[Dataset], dataset: Input[Dataset], teacher: Input[Model], pseudo: Input[Dataset],
               params: str, run: str, tracking: str, bank: Output[Dataset]):
    """Write index.faiss, embeddings.npy, bank.parquet, pairs.parquet and summary.json into `bank`."""
    from qfm.steps.bank import build_bank as build

    summary = build(local_manifest(manifest.path, dataset.path), teacher.path, pseudo.path, bank.path,
                    load_section("build_bank", params), load_section("run", run),
                    tracking=load_section("tracking", tracking), progress=False)
    note_summary(bank, summary)
