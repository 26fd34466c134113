"""train-teacher: the plain DEIQT recipe on the split's train part (as `qfm train-teacher`), in this step's pod
or, with more than one GPU in all, as a Kubeflow Trainer TrainJob of nodes x gpus_per_node (pipelines.trainjob)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import load_section, local_manifest, log_training_metrics, note_summary
from components.launch_trainjob import train_on_trainjob, training_component, trainjob_wanted


@training_component
def train_teacher(manifest: Input[Dataset], dataset: Input[Dataset], params: str, run: str, tracking: str,
                  model: Output[Model], metrics: Output[Metrics], nodes: int = 1, gpus_per_node: int = 1,
                  pod_gpus: int = 1, image: str = "", gpu_resource: str = "nvidia.com/gpu",
                  node_selector: dict = {}, tolerations: list = [],  # noqa: B006 (KFP defaults are literals)
                  s3_secret: str = "qfm-s3", mlflow_secret: str = "qfm-mlflow"):
    """Train the teacher; `model` holds best.safetensors (epoch chosen on the val part), last.safetensors, history.json,
    training_curves.png, summary.json. The chosen epoch's validation SRCC/PLCC are logged as metrics.
    nodes x gpus_per_node above 1: this pod (pod_gpus must be 0) launches the TrainJob and follows it."""
    from qfm.steps.teacher import train_teacher as train

    sections = {"train_teacher": load_section("train_teacher", params), "run": load_section("run", run),
                "tracking": load_section("tracking", tracking)}
    if trainjob_wanted(nodes, gpus_per_node, pod_gpus):
        summary = train_on_trainjob("train-teacher", sections, manifest=manifest, dataset=dataset, inputs={},
                                    model=model, image=image, nodes=nodes, gpus_per_node=gpus_per_node,
                                    accelerator_type=gpu_resource, node_selector=node_selector,
                                    tolerations=tolerations, s3_secret=s3_secret, mlflow_secret=mlflow_secret)
    else:
        summary = train(local_manifest(manifest.path, dataset.path), model.path, sections["train_teacher"],
                        sections["run"], tracking=sections["tracking"], progress=False)
    log_training_metrics(metrics, summary)
    note_summary(model, summary)
