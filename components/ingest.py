"""ingest: the dataset release -> the normalised manifest with its splits (as `qfm ingest`)."""

from kfp.dsl import Dataset, Input, Output

from components.base import load_section, note_summary, qfm_component


@qfm_component
def ingest(dataset: Input[Dataset], params: str, splits: str, tracking: str, manifest: Output[Dataset]):
    """Read `dataset` (the release as published) with the adapter `params.format`; write manifest.parquet and
    ingest_report.json into `manifest`. `params` / `splits` / `tracking`: the params.yaml sections as JSON;
    the section's `root` is not used (the dataset artifact is the root)."""
    from qfm.data.splits import SplitProtocol
    from qfm.steps.ingest import ingest as run_ingest

    section, split = load_section("ingest", params), load_section("splits", splits)
    protocol = SplitProtocol(n_splits=split.n_splits, test_fraction=split.test_fraction,
                             val_fraction=split.val_fraction, seed=split.seed)
    built = run_ingest(section.format, dataset.path, manifest.path, protocol, options=section.options,
                       skip_invalid=section.skip_invalid, tracking=load_section("tracking", tracking),
                       root_label=dataset.uri, progress=False)
    note_summary(manifest, {k: built.meta[k] for k in ("dataset", "n_images", "n_skipped")})
