"""Data-parallel training on Kubeflow Trainer: what a pipeline training step does when it is given more than
one GPU in all (nodes x gpus_per_node > 1).

The step's own pod (no GPU) becomes a launcher: through the `kubeflow` SDK's TrainerClient it creates a
TrainJob on the `torch-distributed` runtime with `nodes` pods of `gpus_per_node` GPUs each, the project image
and the S3/MLflow secrets as environment variables; it streams node 0's log (rank 0's progress), waits for the
job, and on failure raises with the job's own message and the last lines of every node's log.

Every TrainJob pod runs `run_node`: it fetches the step's inputs (dataset, manifest, upstream models) from S3
once for its node, then starts the node's ranks with torchrun (one per GPU; the node count, node rank and
rendezvous come from the PET_* variables the runtime sets), each running the same `qfm train-teacher` /
`qfm train-student` command as a single machine. The output folder is the step's own output artifact on S3,
written by rank 0 (checkpoints after every epoch, so a restarted pod resumes); the launcher then downloads it
into the artifact's local path to log the chosen epoch's metrics, exactly as the single-pod path does.

These functions are embedded into the training components (kfp ``additional_funcs``), which run in the
project image without this repository: keep them self-contained (imports inside, builtin type hints, no
module-level names), like components/base.py's helpers.
"""


def trainjob_wanted(nodes: int, gpus_per_node: int, pod_gpus: int) -> bool:
    """True when the step launches a TrainJob (more than one GPU in all), False when it trains in its own pod.
    Refuses layouts that make no sense, or that would reserve GPUs the code does not use."""
    from qfm.errors import ConfigError

    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"nodes={nodes}, gpus_per_node={gpus_per_node}: both must be 1 or more (1 and 1 train in "
                          "the step's own pod; more launch a Kubeflow Trainer TrainJob of nodes x gpus_per_node GPUs)")
    if nodes * gpus_per_node == 1:
        return False
    if pod_gpus != 0:
        raise ConfigError(f"training_pod_gpus={pod_gpus} with nodes={nodes} x gpus_per_node={gpus_per_node}: the "
                          "TrainJob owns the GPUs, so this launcher pod would hold GPUs no code uses; set "
                          "training_pod_gpus to 0 (pipelines.submit does)")
    return True


def object_store_uri(uri: str, what: str) -> str:
    """An artifact URI as a TrainJob pod reads it over S3: s3:// as is; minio:// (KFP's default artifact store)
    as the same bucket and key, on the endpoint AWS_ENDPOINT_URL of the S3 secret."""
    from qfm.errors import ConfigError

    if uri.startswith("s3://"):
        return uri.rstrip("/")
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://"):].rstrip("/")
    raise ConfigError(f"{what} is at {uri!r}: a TrainJob's pods reach artifacts over S3 only; run the pipeline with "
                      "an s3:// or minio:// pipeline root and dataset URI (pipelines.submit --pipeline-root)")


def run_node(plan: dict) -> int:
    """What every TrainJob pod runs: fetch the inputs once for this node, then `torchrun -m qfm.cli STEP ...`
    (the `qfm` command, as a module that exists in every version of the image).

    plan: step (train-teacher or train-student), dataset and manifest (s3:// folders), inputs ({flag: s3://
    folder}, e.g. teacher), params (the params.yaml sections, as mappings), out (s3:// folder), nproc_per_node.
    Returns torchrun's exit status (the pod's).
    """
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import yaml

    from qfm.data.manifest import read_manifest, write_manifest
    from qfm.storage.staging import Storage, fetch_folder

    work = Path(tempfile.mkdtemp(prefix="qfm-node-"))
    try:  # the node's copies of the dataset and manifest go when torchrun ends (a local run shares /tmp)
        storage = Storage(cache=work / "cache")  # endpoint: AWS_ENDPOINT_URL from the S3 secret, else AWS
        dataset, fetched = fetch_folder(plan["dataset"], storage, what="dataset")
        print(f"fetched {fetched.summary()}", flush=True)
        manifest, fetched = fetch_folder(plan["manifest"], storage, what="--manifest")
        write_manifest(read_manifest(manifest, root=dataset), work / "manifest")  # re-rooted at this node's copy
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={plan['nproc_per_node']}",
                "-m", "qfm.cli", plan["step"], "--manifest", str(work / "manifest")]
        for flag, uri in plan["inputs"].items():
            local, fetched = fetch_folder(uri, storage, what=f"--{flag}")
            print(f"fetched {fetched.summary()}", flush=True)
            argv += [f"--{flag}", str(local)]
        (work / "params.yaml").write_text(yaml.safe_dump(plan["params"], sort_keys=True))
        argv += ["--params", str(work / "params.yaml"), "--out", plan["out"], "--resume", "--cache", str(storage.cache),
                 "--quiet"]
        print(f"node {os.environ.get('PET_NODE_RANK', '?')} of {os.environ.get('PET_NNODES', '?')}: torchrun "
              f"{' '.join(argv[3:])}", flush=True)
        (work / "tmp").mkdir()  # torchrun's and the ranks' scratch folders, removed with the rest
        return subprocess.run(argv, check=False, env=os.environ | {"TMPDIR": str(work / "tmp")}).returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


def node_command() -> list:
    """The TrainJob container's command: run_node's source, called on the plan (the container's one argument)."""
    import inspect

    source = inspect.getsource(run_node)
    return ["python", "-c", f"{source}\nimport json, sys\nsys.exit(run_node(json.loads(sys.argv[1])))\n"]


def secret_env(s3_secret: str, mlflow_secret: str) -> list:
    """The TrainJob pods' environment from the same secrets and keys as every pipeline step (qfm_pipeline);
    the optional keys are set only when the secret has them."""
    keys = [(s3_secret, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"], False),
            (s3_secret, ["AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"], True),
            (mlflow_secret, ["MLFLOW_TRACKING_URI"], False),
            (mlflow_secret, ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                             "MLFLOW_S3_ENDPOINT_URL"], True)]
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}
            for secret, names, optional in keys for key in names]


def trainjob_request(plan: dict, *, image: str, nodes: int, gpus_per_node: int, accelerator_type: str,
                     node_selector: dict, tolerations: list, s3_secret: str, mlflow_secret: str, name: str):
    """The SDK's description of the TrainJob: (CustomTrainerContainer, options) for TrainerClient.train.

    The container of the runtime's `node` pods gets the project image, node_command with the plan as its
    argument, `gpus_per_node` x accelerator_type (requests = limits), the secrets' variables, a 2 GiB
    memory-backed /dev/shm (DataLoader workers, NCCL), and the GPU steps' node selector and tolerations.
    """
    import json

    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import (
        ContainerPatch,
        JobSetSpecPatch,
        JobSetTemplatePatch,
        JobSpecPatch,
        JobTemplatePatch,
        Labels,
        Name,
        PodSpecPatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainerArgs,
        TrainerCommand,
        TrainingRuntimeSpecPatch,
    )

    trainer = CustomTrainerContainer(image=image, num_nodes=nodes, resources_per_node={accelerator_type: gpus_per_node},
                                     env={"PYTHONUNBUFFERED": "1"})
    pod = PodSpecPatch(
        volumes=[{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
        containers=[ContainerPatch(name="node", env=secret_env(s3_secret, mlflow_secret),
                                   volume_mounts=[{"name": "dshm", "mountPath": "/dev/shm"}])],
        node_selector=dict(node_selector) or None, tolerations=list(tolerations) or None)
    patch = RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(
        spec=JobSetSpecPatch(replicated_jobs=[ReplicatedJobPatch(name="node", template=JobTemplatePatch(
            spec=JobSpecPatch(template=PodTemplatePatch(spec=pod))))]))))
    options = [Name(name), Labels({"app.kubernetes.io/part-of": "qfm", "qfm/step": plan["step"]}),
               TrainerCommand(node_command()), TrainerArgs([json.dumps(plan, sort_keys=True)]), patch]
    return trainer, options


def follow_trainjob(client, name: str, nodes: int, poll_s: int = 10, start_timeout_s: int = 86400) -> None:
    """Wait for the TrainJob to start, print node 0's log as it comes (rank 0 reports the epochs), and wait for
    the end; raise RuntimeError with the job's failure message and every node's last log lines if it failed."""
    import time

    from kubeflow.trainer.constants import constants

    done = {constants.TRAINJOB_COMPLETE, constants.TRAINJOB_FAILED}
    seen = []

    def report(job):  # while waiting for GPUs (or an image pull): each change of the job's or its pods' state
        state = f"{job.status}; " + ", ".join(f"{s.name} {s.status}" for s in job.steps)
        if state not in seen:
            seen.append(state)
            print(f"TrainJob {name}: {state}", flush=True)

    job = client.wait_for_job_status(name, status=done | {constants.TRAINJOB_RUNNING}, timeout=start_timeout_s,
                                     polling_interval=poll_s, callbacks=[report])
    while job.status not in done:
        for line in client.get_job_logs(name, step="node-0", follow=True):
            print(line.rstrip("\n"), flush=True)
        time.sleep(poll_s)  # the log ends with node 0's container (or a restart of it): look again
        job = client.get_job(name)
    if job.status == constants.TRAINJOB_COMPLETE:
        print(f"TrainJob {name} completed", flush=True)
        return
    backend = client.backend  # the SDK's TrainJob has no condition message: read the resource itself
    resource = backend.custom_api.get_namespaced_custom_object(constants.GROUP, constants.VERSION, backend.namespace,
                                                               constants.TRAINJOB_PLURAL, name)
    reasons = [f"{c.get('reason', '')}: {c.get('message', '')}" for c in resource.get("status", {}).get("conditions", [])
               if c.get("type") == constants.TRAINJOB_FAILED]
    tails = []
    for node in range(nodes):
        try:
            lines = list(client.get_job_logs(name, step=f"node-{node}"))
        except RuntimeError as exc:  # a pod already gone: the job's reason still says what happened
            lines = [f"(no log: {exc})"]
        if lines:
            tails.append(f"--- node-{node}, last lines ---\n" + "\n".join(lines[-20:]))
    raise RuntimeError(f"TrainJob {backend.namespace}/{name} failed ({'; '.join(reasons) or 'no reason given'})"
                       + ("\n" + "\n".join(tails) if tails else "") +
                       f"\n(the step deletes the TrainJob as it fails, to free its GPUs; `kubectl -n "
                       f"{backend.namespace} get events` lists what happened to its pods)")


def delete_trainjob(client, name: str) -> None:
    """Delete a TrainJob that did not succeed (its pods, their GPUs, its writes to the step's output), saying
    so; a failure to delete is printed with the command that does it by hand, never raised over the step's
    own error."""
    namespace = getattr(client.backend, "namespace", "NAMESPACE")
    try:
        client.delete_job(name)
    except Exception as exc:  # noqa: BLE001 (the step's own error is the one to raise)
        print(f"could not delete TrainJob {namespace}/{name} ({exc}); if it exists, delete it: kubectl -n "
              f"{namespace} delete trainjob {name}", flush=True)
        return
    print(f"deleted TrainJob {namespace}/{name}: the step did not succeed", flush=True)


def train_on_trainjob(step: str, sections: dict, *, manifest, dataset, inputs: dict, model, image: str, nodes: int,
                      gpus_per_node: int, accelerator_type: str, node_selector: dict, tolerations: list,
                      s3_secret: str, mlflow_secret: str, poll_s: int = 10) -> dict:
    """Run a training step as a TrainJob and bring its output into `model` (an Output[Model]); returns the
    step's summary.json. sections: the params.yaml sections the step reads, checked (load_section);
    inputs: {flag: input artifact}, e.g. {"teacher": teacher}."""
    import dataclasses
    import json
    import signal
    import uuid
    from pathlib import Path

    from kubeflow.trainer import TrainerClient

    from qfm.errors import ConfigError
    from qfm.storage.s3 import download_prefix, make_client

    if not image.strip():
        raise ConfigError("image is empty: a TrainJob runs the pushed project image (the pipeline's `image`)")
    plan = {"step": step, "dataset": object_store_uri(dataset.uri, "the dataset"),
            "manifest": object_store_uri(manifest.uri, "the manifest"),
            "inputs": {flag: object_store_uri(a.uri, f"--{flag}") for flag, a in inputs.items()},
            "out": object_store_uri(model.uri, "the model output"), "nproc_per_node": gpus_per_node,
            "params": {k: dataclasses.asdict(v) for k, v in sections.items()}}
    name = f"qfm-{step.removeprefix('train-')}-{uuid.uuid4().hex[:8]}"
    trainer, options = trainjob_request(plan, image=image, nodes=nodes, gpus_per_node=gpus_per_node,
                                        accelerator_type=accelerator_type, node_selector=node_selector,
                                        tolerations=tolerations, s3_secret=s3_secret, mlflow_secret=mlflow_secret,
                                        name=name)
    client = TrainerClient()  # in a pod: its service account and namespace; elsewhere: the kube-config
    try:
        runtime = client.get_runtime("torch-distributed")
    except Exception as exc:
        raise RuntimeError("cannot read the Kubeflow Trainer runtime 'torch-distributed': install Kubeflow Trainer "
                           "with its default runtimes, and let this pipeline's service account get "
                           f"clustertrainingruntimes ({exc})") from exc

    def stopped(signum, frame):  # KFP stops a step with SIGTERM
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stopped)
    succeeded = False
    try:
        client.train(runtime=runtime, trainer=trainer, options=options)
        print(f"created TrainJob {client.backend.namespace}/{name}: {nodes} node(s) x {gpus_per_node} "
              f"{accelerator_type}, image {image}; output {plan['out']}", flush=True)
        follow_trainjob(client, name, nodes, poll_s=poll_s)
        succeeded = True
    finally:  # stopped, failed, or an API or log-stream error: free the TrainJob's GPUs and its output
        signal.signal(signal.SIGTERM, previous)
        if not succeeded:
            delete_trainjob(client, name)
    report = download_prefix(plan["out"], model.path, make_client())
    print(f"fetched {report.summary()}", flush=True)
    return json.loads((Path(model.path) / "summary.json").read_text())
