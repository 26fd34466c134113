"""ingest: the dataset release -> the normalised manifest with its splits (as `qfm ingest`)."""

from kfp.dsl import Dataset, Input, Output

from components.base import load_section, note_summary, qfm_component


@qfm_component
def ingest(dataset: Input[Dataset], params: str, splits: str, tracking: str, manifest: Output[Dataset]):
    """Read `dataset` (the release as published) with the adapter `params.format`; write manifest.parquet and
    ingest_report.json into `manifest`. `params` / `splits` / `tracking`: the params.yaml sections as JSON;
    the section's `root` is not used (the dataset artifact is the root)."""
    from pathlib import Path

    from qfm.data.adapters import read_dataset
    from qfm.data.manifest import build_manifest, write_manifest
    from qfm.data.splits import SplitProtocol
    from qfm.errors import ConfigError
    from qfm.tracking import flat_params, step_run

    section, split = load_section("ingest", params), load_section("splits", splits)
    try:
        raw = read_dataset(section.format, dataset.path, **section.options)
    except TypeError as exc:  # an option the adapter does not take
        raise ConfigError(f"ingest.options: format '{section.format}' does not take that option: {exc}") from exc
    protocol = SplitProtocol(n_splits=split.n_splits, test_fraction=split.test_fraction,
                             val_fraction=split.val_fraction, seed=split.seed)
    logged = {"ingest.format": section.format, "ingest.root": dataset.uri, "ingest.options": section.options,
              "ingest.skip_invalid": section.skip_invalid}
    with step_run("ingest", load_section("tracking", tracking), params=logged | flat_params("splits", protocol),
                  data_root=dataset.path) as run:
        built = build_manifest(raw, protocol, skip_invalid=section.skip_invalid, progress=False)
        write_manifest(built, manifest.path)
        run.log_metrics({"n_images": built.meta["n_images"], "n_skipped": built.meta["n_skipped"]})
        run.log_artifacts([Path(manifest.path) / "ingest_report.json"])
    note_summary(manifest, {k: built.meta[k] for k in ("dataset", "n_images", "n_skipped")})
