"""promote: register the student in MLflow and gate the `champion` alias (as `qfm promote`)."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.base import load_section, local_manifest, note_summary, qfm_component


@qfm_component
def promote(manifest: Input[Dataset], dataset: Input[Dataset], model: Input[Model], evaluation: Input[Dataset],
            params: str, run: str, tracking: str, promotion: Output[Artifact]) -> str:
    """Register `model` as a version of promote.model_name (alias `challenger`; `champion` only if its
    validation metric beats the champion's by promote.margin), at $MLFLOW_TRACKING_URI, else tracking.uri;
    writes promotion.json into `promotion` and returns the version's models:/NAME/VERSION URI."""
    from qfm.steps.promote import promote as register

    result = register(model.path, local_manifest(manifest.path, dataset.path), promotion.path,
                      load_section("promote", params), load_section("run", run), eval_dir=evaluation.path,
                      tracking=load_section("tracking", tracking), progress=False)
    note_summary(promotion, result | {"aliases": ",".join(result["aliases"])})
    print(f"promote: {result['model_name']} version {result['version']} is {' and '.join(result['aliases'])}; "
          f"{result['reason']}")
    return f"models:/{result['model_name']}/{result['version']}"
