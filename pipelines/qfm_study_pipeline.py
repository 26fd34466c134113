"""The study pipeline: `qfm study` on Kubeflow. Rows of parameter overrides trained and tested on the same
splits, then compared by pairs with the reference row.

    ingest -> validate -> study-plan
      ParallelFor split in the plan's splits:
        study-units (the split's teacher, DLE pools and SNM banks, each once for every row that uses it)
        ParallelFor row in the rows:
          study-row (the row's student on the split's units, and its test evaluation)
        study-gather (Collected: the split's row results)
    study-report (Collected: every split) -> study.md (Markdown), the plot (HTML), per-row metrics

The steps call the pieces of qfm.steps.study one by one (shared_units, run_row_safely, summarize), so the
figures and the units' keys are those of `qfm study`. The results are fanned in one loop level at a time
(study-gather per split, then the report), which both kfp.local and the KFP backend support. Parameters as
in pipelines.qfm_pipeline: params.yaml sections as JSON text; `rows` is a rows file's content as JSON.
"""

import json

from kfp import dsl
from kfp.dsl import Dataset

import components as qc
from components.base import DEFAULT_IMAGE
from pipelines.qfm_pipeline import GPU_TOLERATIONS, _on_gpu, _qfm_step, section_arguments
from qfm.config import load_params
from qfm.steps.study import read_rows, rows_mapping

STUDY_PIPELINE_NAME = "qfm-study"
STUDY_SECTIONS = ("ingest", "splits", "validate", "run", "train_teacher", "pseudo_label", "build_bank",
                  "train_student", "tracking")
TRAINING_SECTIONS = ("run", "train_teacher", "pseudo_label", "build_bank", "train_student")


def rows_argument(rows_file: str | None) -> str:
    """The `rows` parameter: a rows file (None: the default rows, baseline and qfm), checked, as JSON text."""
    return json.dumps(rows_mapping(*read_rows(rows_file)))


def study_arguments(params: dict, rows_file: str | None = None, splits: list[str] = ()) -> dict:
    """The study pipeline's parameters from validated params, a rows file and the splits (empty: all)."""
    sections = section_arguments(params)
    return {**{name: sections[name] for name in STUDY_SECTIONS}, "rows": rows_argument(rows_file),
            "study_splits": list(splits)}


_DEFAULTS = study_arguments(load_params(None))


@dsl.pipeline(name=STUDY_PIPELINE_NAME, description="A qfm study: rows of parameter overrides on the same splits, "
                                                    "sharing each split's teacher, pools and banks, compared by "
                                                    "pairs with the reference row")
def qfm_study_pipeline(
    dataset_uri: str,
    rows: str = _DEFAULTS["rows"],
    study_splits: list = [],  # noqa: B006 (a KFP pipeline parameter default must be a literal)
    image: str = DEFAULT_IMAGE,
    ingest: str = _DEFAULTS["ingest"],
    splits: str = _DEFAULTS["splits"],
    validate: str = _DEFAULTS["validate"],
    run: str = _DEFAULTS["run"],
    train_teacher: str = _DEFAULTS["train_teacher"],
    pseudo_label: str = _DEFAULTS["pseudo_label"],
    build_bank: str = _DEFAULTS["build_bank"],
    train_student: str = _DEFAULTS["train_student"],
    tracking: str = _DEFAULTS["tracking"],
    accelerator_type: str = "nvidia.com/gpu",
    gpu_count: int = 1,
    gpu_node_selector: dict = {},  # noqa: B006
    gpu_tolerations: list = GPU_TOLERATIONS,
    s3_secret: str = "qfm-s3",
    mlflow_secret: str = "qfm-mlflow",
):
    """dataset_uri: the dataset release as published (as in qfm-iqm). rows: {"rows": {NAME: {section.key:
    value}}, "reference": NAME} as JSON (default: baseline and qfm). study_splits: the split columns to run on
    (empty: every split the ingest makes). The other sections are the study's parameters, under each row's
    overrides. The best row is chosen on validation SRCC; test figures are reported, never used to choose."""
    def step(task):
        return _qfm_step(task, image, s3_secret, mlflow_secret)

    def gpu(task):
        task = _on_gpu(step(task), accelerator_type, gpu_count, gpu_node_selector, gpu_tolerations)
        # kfp 2.17 does not pass the channels of a task's resources into a ParallelFor's inputs by itself
        task.register_pipeline_channels([accelerator_type, gpu_count])
        return task

    data = dsl.importer(artifact_uri=dataset_uri, artifact_class=Dataset, reimport=False).output
    manifest = step(qc.ingest(dataset=data, params=ingest, splits=splits, tracking=tracking)).outputs["manifest"]
    checked = step(qc.validate(manifest=manifest, dataset=data, params=validate, tracking=tracking))
    plan = step(qc.study_plan(manifest=manifest, dataset=data, rows=rows, study_splits=study_splits, run=run,
                              train_teacher=train_teacher, pseudo_label=pseudo_label, build_bank=build_bank,
                              train_student=train_student).after(checked))
    with dsl.ParallelFor(plan.outputs["Output"], name="for-each-split") as split:
        units = gpu(qc.study_units(manifest=manifest, dataset=data, plan=plan.outputs["plan"], split=split))
        with dsl.ParallelFor(units.outputs["Output"], name="for-each-row") as item:  # {split, row} items
            result = gpu(qc.study_row(manifest=manifest, dataset=data, plan=plan.outputs["plan"],
                                      units=units.outputs["units"], split=item.split, row=item.row))
        gathered = step(qc.study_gather(split=split, results=dsl.Collected(result.outputs["result"])))
    step(qc.study_report(plan=plan.outputs["plan"], splits=dsl.Collected(gathered.outputs["split_results"])))
