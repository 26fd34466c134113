"""The QFM-IQM pipeline, mirroring dvc.yaml: ingest -> validate -> train-teacher -> pseudo-label ->
build-bank -> train-student -> evaluate -> promote, each step one component calling one qfm function.

Every params.yaml section is one string parameter holding the section as JSON (see components.base). GPU
steps ask for accelerators through the task's resources and kfp-kubernetes (node selector, tolerations),
and get a memory-backed /dev/shm for DataLoader workers; every step reads the S3 and MLflow credentials
from Kubernetes secrets as environment variables.

The two training steps train in their own pod with `gpu_count` GPUs when `nodes` x `gpus_per_node` is 1; above
that, their pod asks for `training_pod_gpus` (0: pipelines.submit sets it) and launches a Kubeflow Trainer
TrainJob of `nodes` pods x `gpus_per_node` GPUs that owns the GPUs (pipelines.trainjob). One task either way:
kfp.local cannot collect an artifact from conditional branches (dsl.OneOf), and the local run is the same DAG.
"""

import dataclasses
import json

from kfp import dsl, kubernetes
from kfp.dsl import Dataset

import components as qc
from components.base import DEFAULT_IMAGE
from qfm.config import load_params

PIPELINE_NAME = "qfm-iqm"
SECTIONS = ("ingest", "splits", "validate", "run", "train_teacher", "pseudo_label", "build_bank", "train_student",
            "tracking", "promote", "final")
SHM_SIZE = "2Gi"
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
# Secret key -> environment variable. The required keys must exist in the secret (the pod does not start
# otherwise, naming the secret); the optional ones are set only when present.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
S3_OPTIONAL_KEYS = {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION"}
MLFLOW_KEYS = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}
MLFLOW_OPTIONAL_KEYS = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                        "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
                        "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN",
                        "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"}


def section_arguments(params: dict) -> dict[str, str]:
    """The pipeline's section parameters (JSON text) from validated params (qfm.config.load_params)."""
    return {name: json.dumps(dataclasses.asdict(params[name]), sort_keys=True) for name in SECTIONS}


_DEFAULTS = section_arguments(load_params(None))


def _qfm_step(task: dsl.PipelineTask, image, s3_secret, mlflow_secret, *, cache: bool = True) -> dsl.PipelineTask:
    """Every step: the project image, credentials from secrets, caching (off only where a step has effects)."""
    task.set_container_image(image).set_caching_options(cache)
    kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_KEYS)
    kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_OPTIONAL_KEYS, optional=True)
    kubernetes.use_secret_as_env(task, secret_name=mlflow_secret, secret_key_to_env=MLFLOW_KEYS)
    kubernetes.use_secret_as_env(task, secret_name=mlflow_secret, secret_key_to_env=MLFLOW_OPTIONAL_KEYS,
                                 optional=True)
    return task


def _on_gpu(task: dsl.PipelineTask, accelerator_type, gpu_count, node_selector, tolerations) -> dsl.PipelineTask:
    """A model-running step: accelerators (gpu_count of them), GPU node placement, and shared memory for
    DataLoader workers."""
    task.set_accelerator_type(accelerator_type).set_accelerator_limit(gpu_count)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=SHM_SIZE)
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="QFM-IQM: teacher, DLE pseudo-labels, SNM bank, QCC student, "
                                              "evaluation and gated registration of a no-reference image quality model")
def qfm_pipeline(
    dataset_uri: str,
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
    promote: str = _DEFAULTS["promote"],
    final: str = _DEFAULTS["final"],
    final_model: bool = False,
    min_val_srcc: float = 0.0,
    accelerator_type: str = "nvidia.com/gpu",
    gpu_count: int = 1,
    nodes: int = 1,
    gpus_per_node: int = 1,
    training_pod_gpus: int = 1,
    gpu_node_selector: dict = {},  # noqa: B006 (a KFP pipeline parameter default must be a literal)
    gpu_tolerations: list = GPU_TOLERATIONS,
    s3_secret: str = "qfm-s3",
    mlflow_secret: str = "qfm-mlflow",
):
    """dataset_uri: the dataset release as published (e.g. s3://bucket/datasets/koniq10k), imported as a
    Dataset artifact. The section parameters are params.yaml's sections as JSON. The student reaches the
    registry (promote) only when its validation SRCC (of the epoch chosen on val) is at least min_val_srcc; there,
    promote's own gate decides whether it becomes the champion (validation metric against the champion's, on
    the same data). The test figures are reported, never used to decide. gpu_count: GPUs of each GPU step's pod
    (0 or 1). nodes x gpus_per_node: the training steps' GPUs; above 1, a TrainJob owns them and the training
    pods ask for training_pod_gpus, which must then be 0 (else it is gpu_count; pipelines.submit sets it).
    final_model: also train the model to ship (train-final: the recipe on every labelled image but a validation
    part carved by the `final` section), after the split's evaluation, and promote it through the same gates
    (its validation SRCC at least min_val_srcc, then promote's gate on the carved validation part); the split's
    student is still trained, tested and promoted as the recipe's evidence."""
    def step(task, cache=True):
        return _qfm_step(task, image, s3_secret, mlflow_secret, cache=cache)

    def gpu(task, count=gpu_count):
        return _on_gpu(step(task), accelerator_type, count, gpu_node_selector, gpu_tolerations)

    def training(task):  # in its own pod, or the launcher of a TrainJob on the same image, secrets and placement
        return gpu(task, training_pod_gpus)

    # (not `accelerator_type`: kfp adds task inputs of that name for the resource request)
    layout = {"nodes": nodes, "gpus_per_node": gpus_per_node, "pod_gpus": training_pod_gpus, "image": image,
              "gpu_resource": accelerator_type, "node_selector": gpu_node_selector,
              "tolerations": gpu_tolerations, "s3_secret": s3_secret, "mlflow_secret": mlflow_secret}

    data = dsl.importer(artifact_uri=dataset_uri, artifact_class=Dataset, reimport=False).output
    manifest = step(qc.ingest(dataset=data, params=ingest, splits=splits, tracking=tracking)).outputs["manifest"]
    checked = step(qc.validate(manifest=manifest, dataset=data, params=validate, tracking=tracking))
    teacher = training(qc.train_teacher(manifest=manifest, dataset=data, params=train_teacher, run=run,
                                        tracking=tracking, **layout).after(checked))
    pseudo = gpu(qc.pseudo_label(manifest=manifest, dataset=data, teacher=teacher.outputs["model"],
                                 params=pseudo_label, run=run, tracking=tracking))
    bank = gpu(qc.build_bank(manifest=manifest, dataset=data, teacher=teacher.outputs["model"],
                             pseudo=pseudo.outputs["pseudo"], params=build_bank, run=run,
                             tracking=tracking))
    student = training(qc.train_student(manifest=manifest, dataset=data, teacher=teacher.outputs["model"],
                                        pseudo=pseudo.outputs["pseudo"], bank=bank.outputs["bank"],
                                        params=train_student, run=run, tracking=tracking, **layout))
    evaluation = gpu(qc.evaluate(manifest=manifest, dataset=data, model=student.outputs["model"], run=run,
                                 tracking=tracking))
    with dsl.If(student.outputs["Output"] >= min_val_srcc, name="val-srcc-at-least-min-val-srcc"):
        step(qc.promote(manifest=manifest, dataset=data, model=student.outputs["model"],
                        evaluation=evaluation.outputs["results"], params=promote, run=run, tracking=tracking),
             cache=False)
    with dsl.If(final_model == True, name="final-model"):  # a KFP condition on the parameter, not a Python test
        final_task = gpu(qc.train_final(manifest=manifest, dataset=data, train_teacher=train_teacher,
                                        pseudo_label=pseudo_label, build_bank=build_bank, train_student=train_student,
                                        run=run, final=final, tracking=tracking).after(evaluation))
        with dsl.If(final_task.outputs["val_srcc"] >= min_val_srcc, name="final-val-srcc-at-least-min-val-srcc"):
            # no test part: its `evaluation` is the training record (promote tags no test figures from it)
            step(qc.promote(manifest=final_task.outputs["data"], dataset=data, model=final_task.outputs["model"],
                            evaluation=final_task.outputs["data"], params=promote, run=final_task.outputs["run"],
                            tracking=tracking), cache=False)
