"""Training on Kubeflow Trainer (pipelines.trainjob): the layout rules, the TrainJob the `kubeflow` SDK sends, and the
launcher and node code run end to end on the tiny demo.

No Kubernetes cluster exists here, so the one stand-in is `FakeCluster`: an HTTP server answering the few
Kubernetes API calls the SDK makes (runtime, TrainJob, pods, logs). It records the TrainJob exactly as the SDK
POSTs it, and "schedules" it as the Trainer's torch plugin would: it runs the TrainJob's own container command
and argument on this machine with the PET_* variables, the spec's literal environment and its secret
references resolved from test secrets, so the node code, torchrun, `qfm train-*` and the S3 transfers (moto)
are all real. The SDK's LocalProcessBackend cannot stand in: it runs only a CustomTrainer Python function,
in a fresh virtual environment it pip-installs torch into, never a container command like ours.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from kfp.dsl import Dataset, Metrics, Model
from test_kfp_components import TINY

import components as qc
from pipelines import qfm_pipeline, trainjob
from qfm.config import load_params
from qfm.errors import ConfigError

NAMESPACE = "qfm-test"
GROUP = "/apis/trainer.kubeflow.org/v1alpha1"
RUNTIME = {  # the torch-distributed ClusterTrainingRuntime as Kubeflow Trainer installs it
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {"mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
             "template": {"spec": {"replicatedJobs": [{
                 "name": "node",
                 "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                              "spec": {"template": {"spec": {"containers": [{
                                  "name": "node", "image": "pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime",
                                  "command": ["/bin/bash", "-c", "echo Torch Distributed Runtime"]}]}}}}}]}}}}


# The layout rules and the pieces of the spec ---------------------------------------------------------------

def test_more_than_one_gpu_in_all_launches_a_trainjob_and_idle_gpus_are_refused():
    assert trainjob.trainjob_wanted(1, 1, 1) is False and trainjob.trainjob_wanted(1, 1, 0) is False
    assert trainjob.trainjob_wanted(2, 1, 0) is True and trainjob.trainjob_wanted(1, 4, 0) is True
    with pytest.raises(ConfigError, match="training_pod_gpus=1 with nodes=2 x gpus_per_node=4: the TrainJob owns"):
        trainjob.trainjob_wanted(2, 4, 1)
    with pytest.raises(ConfigError, match="nodes=0, gpus_per_node=1: both must be 1 or more"):
        trainjob.trainjob_wanted(0, 1, 0)


def test_artifacts_are_reached_over_s3():
    assert trainjob.object_store_uri("s3://b/kfp/x/", "m") == "s3://b/kfp/x"
    assert trainjob.object_store_uri("minio://mlpipeline/v2/artifacts/x", "m") == "s3://mlpipeline/v2/artifacts/x"
    with pytest.raises(ConfigError, match=r"the manifest is at 'gs://b/x': a TrainJob's pods reach artifacts over S3"):
        trainjob.object_store_uri("gs://b/x", "the manifest")


def test_trainjob_pods_read_the_same_secret_keys_as_every_pipeline_step():
    env = trainjob.secret_env("s3-secret", "mlflow-secret")
    wanted = {(secret, key, optional) for secret, keys, optional in (
        ("s3-secret", qfm_pipeline.S3_KEYS, False), ("s3-secret", qfm_pipeline.S3_OPTIONAL_KEYS, True),
        ("mlflow-secret", qfm_pipeline.MLFLOW_KEYS, False), ("mlflow-secret", qfm_pipeline.MLFLOW_OPTIONAL_KEYS, True))
        for key in keys}
    assert {(e["valueFrom"]["secretKeyRef"]["name"], e["name"], e["valueFrom"]["secretKeyRef"]["optional"])
            for e in env} == wanted
    assert all(e["valueFrom"]["secretKeyRef"]["key"] == e["name"] and "value" not in e for e in env)


# A stand-in for the Kubernetes API ---------------------------------------------------------------------------

class FakeCluster(ThreadingHTTPServer):
    """The Kubernetes API calls the kubeflow SDK makes, with each created TrainJob's nodes run here (see the
    module docstring). `created` holds the TrainJob bodies as POSTed."""

    daemon_threads = True

    def __init__(self, secrets: dict[str, dict[str, str]], base_env: dict[str, str], work: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Api)
        self.secrets, self.base_env, self.work = secrets, base_env, work
        self.created: list[dict] = []
        self.jobs: dict[str, dict] = {}  # name -> {"body", "nodes": [(process, log path)]}
        self.deleted: list[str] = []
        self.run_nodes = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self, body: dict) -> None:
        """Run the TrainJob's nodes as the torch plugin would: PET_* variables, the trainer's command and args."""
        name, trainer = body["metadata"]["name"], body["spec"]["trainer"]
        nodes, port = trainer.get("numNodes", 1), _free_port()
        patch = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        container = patch["template"]["spec"]["template"]["spec"]["containers"][0]
        env = dict(self.base_env) | {e["name"]: e["value"] for e in trainer.get("env", [])}
        for entry in container["env"]:
            ref = entry["valueFrom"]["secretKeyRef"]
            if ref["key"] in self.secrets.get(ref["name"], {}):
                env[entry["name"]] = self.secrets[ref["name"]][ref["key"]]
            elif not ref["optional"]:
                raise AssertionError(f"secret {ref['name']} has no key {ref['key']}: the pod would not start")
        job = {"body": body, "nodes": []}
        for rank in range(nodes if self.run_nodes else 0):
            log = self.work / f"{name}-node-{rank}.log"
            pet = {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": str(rank),
                   "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
            with open(log, "wb") as out:
                process = subprocess.Popen([*trainer["command"], *trainer["args"]], env=env | pet, stdout=out,
                                           stderr=subprocess.STDOUT, cwd=self.work, start_new_session=True)
            job["nodes"].append((process, log))
        self.jobs[name] = job

    def stop_all(self) -> None:
        for job in self.jobs.values():
            for process, _ in job["nodes"]:
                if process.poll() is None:
                    os.killpg(process.pid, 9)
                    process.wait()


class _Api(BaseHTTPRequestHandler):
    server: FakeCluster
    protocol_version = "HTTP/1.0"  # a body ends when the connection closes: how a followed log streams

    def log_message(self, *args):
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _missing(self) -> None:
        self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        if url.path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
            return self._json(200, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": parts[-1]},
                                    "data": {"kubeflow_trainer_version": "v2.3.0"}})
        if url.path == f"{GROUP}/clustertrainingruntimes/torch-distributed":
            return self._json(200, RUNTIME)
        if url.path.startswith(f"{GROUP}/namespaces/{NAMESPACE}/trainjobs/") and parts[-1] in self.server.jobs:
            return self._json(200, self._trainjob(parts[-1]))
        if url.path == f"/api/v1/namespaces/{NAMESPACE}/pods":
            return self._json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self._pods()})
        if url.path.startswith(f"/api/v1/namespaces/{NAMESPACE}/pods/") and parts[-1] == "log":
            return self._log(parts[-2], query.get("follow") == ["true"])
        return self._missing()

    def do_POST(self):
        url = urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if url.path != f"{GROUP}/namespaces/{NAMESPACE}/trainjobs":
            return self._missing()
        self.server.created.append(body)
        self.server.start(body)
        return self._json(201, body)

    def do_DELETE(self):
        name = urlparse(self.path).path.rsplit("/", 1)[-1]
        self.server.deleted.append(name)
        self.server.stop_all()
        return self._json(200, {"kind": "Status", "status": "Success"})

    def _trainjob(self, name: str) -> dict:
        job = self.server.jobs[name]
        codes = [p.poll() for p, _ in job["nodes"]]
        now = datetime.now(UTC).isoformat(timespec="seconds")
        conditions = []
        if codes and all(c == 0 for c in codes):
            conditions = [{"type": "Complete", "status": "True", "reason": "JobSetCompleted", "lastTransitionTime": now,
                           "message": "jobset completed successfully"}]
        elif any(c not in (None, 0) for c in codes):
            conditions = [{"type": "Failed", "status": "True", "reason": "JobSetFailed", "lastTransitionTime": now,
                           "message": "jobset failed: node-0 exited with code "
                                      f"{next(c for c in codes if c not in (None, 0))}"}]
        return job["body"] | {"metadata": job["body"]["metadata"] | {
            "namespace": NAMESPACE, "creationTimestamp": now},
            "status": {"conditions": conditions}}

    def _pods(self) -> list[dict]:
        pods = []
        for name, job in self.server.jobs.items():
            limits = job["body"]["spec"]["trainer"]["resourcesPerNode"]["limits"]
            for rank, (process, _) in enumerate(job["nodes"]):
                code = process.poll()
                pods.append({"metadata": {
                    "name": f"{name}-node-0-{rank}", "namespace": NAMESPACE,
                    "creationTimestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                    "labels": {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                               "batch.kubernetes.io/job-completion-index": str(rank)}},
                    "spec": {"containers": [{"name": "node", "image": "x", "resources": {"limits": limits}}]},
                    "status": {"phase": "Running" if code is None else "Succeeded" if code == 0 else "Failed"}})
        return pods

    def _log(self, pod: str, follow: bool) -> None:
        name, rank = pod.rsplit("-node-0-", 1)
        process, log = self.server.jobs[name]["nodes"][int(rank)]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        with open(log, "rb") as source:
            while True:
                chunk = source.read()
                if chunk:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                elif not follow or process.poll() is not None:
                    self.wfile.write(source.read())
                    return
                else:
                    time.sleep(0.2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path, s3_env, monkeypatch):
    """A FakeCluster whose kube-config the SDK finds (as $KUBECONFIG), and test secrets: the S3 settings of moto
    and an MLflow store. The node processes inherit no AWS or MLflow variable from here: only the secrets give them."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    base_env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv: the image
                 "OMP_NUM_THREADS": "1", "AWS_CONFIG_FILE": s3_env["AWS_CONFIG_FILE"],
                 "AWS_SHARED_CREDENTIALS_FILE": s3_env["AWS_SHARED_CREDENTIALS_FILE"],
                 "AWS_EC2_METADATA_DISABLED": "true", "TMPDIR": str(tmp_path / "node-tmp")}
    (tmp_path / "node-tmp").mkdir()
    secrets = {"qfm-s3": {k: s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                                 "AWS_DEFAULT_REGION")},
               "qfm-mlflow": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    server = FakeCluster(secrets, base_env, tmp_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
              "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
              "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
              "users": [{"name": "fake", "user": {"token": "not-a-secret"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))  # the client reads it once, when imported:
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))
    yield server
    server.stop_all()
    server.shutdown()
    server.server_close()


@pytest.fixture
def published(tiny_demo, s3_env) -> dict[str, str]:
    """The tiny demo and its manifest in object storage, as a pipeline run on a cluster has them."""
    from qfm.storage.s3 import make_client, upload_dir

    client = make_client()
    client.create_bucket(Bucket="kfp")
    upload_dir(tiny_demo.parent / "demo", "s3://kfp/datasets/demo", client)
    upload_dir(tiny_demo, "s3://kfp/run/ingest/manifest", client)
    return {"dataset": "s3://kfp/datasets/demo", "manifest": "s3://kfp/run/ingest/manifest"}


def _json_sections() -> dict[str, str]:
    """The tiny run's params.yaml sections as the pipeline passes them: JSON text."""
    return {name: json.dumps(dataclasses.asdict(v)) for name, v in load_params(None, overrides=TINY).items()}


def _artifact(cls, uri: str, path: Path):
    """An artifact as the KFP launcher hands it over: its remote URI, and where its files are in the pod."""
    artifact = cls(name=path.name, uri=uri)
    artifact.custom_path = str(path)
    return artifact


# The TrainJob as sent ---------------------------------------------------------------------------------------

def test_the_component_sends_a_torch_distributed_trainjob_of_nodes_x_gpus(cluster, published, tmp_path):
    cluster.run_nodes = False  # the spec only: the job is stopped below, nothing is trained
    s = _json_sections()
    manifest = _artifact(Dataset, published["manifest"], tmp_path / "m")
    dataset = _artifact(Dataset, published["dataset"], tmp_path / "d")
    model = _artifact(Model, "minio://kfp/run/train-teacher/model", tmp_path / "model")

    def stop_after_creation(*_, **__):
        raise KeyboardInterrupt("the test stops the step")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainjob, "follow_trainjob", stop_after_creation)
        with pytest.raises(KeyboardInterrupt):
            qc.train_teacher.python_func(
                manifest=manifest, dataset=dataset, params=s["train_teacher"], run=s["run"], tracking=s["tracking"],
                model=model, metrics=Metrics(name="metrics", uri=str(tmp_path / "metrics")), nodes=2, gpus_per_node=4,
                pod_gpus=0, image="registry.example.com/qfm:0.1.0-cuda", gpu_resource="nvidia.com/gpu",
                node_selector={"nvidia.com/gpu.product": "A100"},
                tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                s3_secret="qfm-s3", mlflow_secret="qfm-mlflow")
    [job] = cluster.created
    name = job["metadata"]["name"]
    assert cluster.deleted == [name]  # a stopped step frees the TrainJob's GPUs
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert name.startswith("qfm-teacher-") and len(name) == len("qfm-teacher-") + 8
    assert job["metadata"]["labels"] == {"app.kubernetes.io/part-of": "qfm", "qfm/step": "train-teacher"}
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["image"] == "registry.example.com/qfm:0.1.0-cuda"
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 4}, "requests": {"nvidia.com/gpu": 4}}
    assert trainer["env"] == [{"name": "PYTHONUNBUFFERED", "value": "1"}]  # every credential comes from secrets
    assert trainer["command"][:2] == ["python", "-c"] and "def run_node(plan: dict)" in trainer["command"][2]
    plan = json.loads(trainer["args"][0])
    assert plan["step"] == "train-teacher" and plan["nproc_per_node"] == 4 and plan["inputs"] == {}
    assert plan["dataset"] == published["dataset"] and plan["manifest"] == published["manifest"]
    assert plan["out"] == "s3://kfp/run/train-teacher/model"  # the step's own output artifact, minio:// as s3://
    assert plan["params"]["train_teacher"]["epochs"] == 1 and plan["params"]["run"]["device"] == "cpu"
    [patch] = spec["runtimePatches"]
    assert patch["manager"] == "trainer.kubeflow.org/kubeflow-sdk"
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]
    [container] = pod["containers"]
    assert container["name"] == "node" and container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert container["env"] == trainjob.secret_env("qfm-s3", "qfm-mlflow")


def _teacher_on_trainjob(published: dict, tmp_path: Path) -> dict:
    sections = {k: v for k, v in load_params(None, overrides=TINY).items() if k in ("train_teacher", "run", "tracking")}
    return trainjob.train_on_trainjob(
        "train-teacher", sections, manifest=_artifact(Dataset, published["manifest"], tmp_path / "m"),
        dataset=_artifact(Dataset, published["dataset"], tmp_path / "d"), inputs={},
        model=_artifact(Model, "s3://kfp/run/train-teacher/model", tmp_path / "model"), image="qfm:test", nodes=1,
        gpus_per_node=1, accelerator_type="nvidia.com/gpu", node_selector={}, tolerations=[], s3_secret="qfm-s3",
        mlflow_secret="qfm-mlflow", poll_s=1)


def test_an_api_or_log_stream_error_deletes_the_trainjob_and_a_success_keeps_it(cluster, published, tmp_path,
                                                                                 monkeypatch, capsys):
    """Not only a stopped step: any error while the step follows its TrainJob (here the Kubernetes API failing
    mid-stream) deletes the job, so that it holds no GPUs and writes nothing more; the step's own error is
    raised. A TrainJob that completed is kept."""
    from kubernetes.client.exceptions import ApiException

    from qfm.storage.s3 import make_client

    cluster.run_nodes = False  # the API calls only

    def stream_breaks(client, name, nodes, poll_s=10):
        raise ApiException(status=500, reason="log stream broke")

    monkeypatch.setattr(trainjob, "follow_trainjob", stream_breaks)
    with pytest.raises(ApiException, match="log stream broke"):
        _teacher_on_trainjob(published, tmp_path)
    name = cluster.created[0]["metadata"]["name"]
    assert cluster.deleted == [name]
    assert f"deleted TrainJob {NAMESPACE}/{name}: the step did not succeed" in capsys.readouterr().out

    monkeypatch.setattr(trainjob, "follow_trainjob", lambda client, name, nodes, poll_s=10: None)  # it completed
    make_client().put_object(Bucket="kfp", Key="run/train-teacher/model/summary.json", Body=b'{"best_epoch": 0}')
    assert _teacher_on_trainjob(published, tmp_path / "ok") == {"best_epoch": 0}
    assert len(cluster.created) == 2 and cluster.deleted == [name]  # the completed one is kept


def test_a_launcher_pod_holding_a_gpu_is_refused_before_anything_is_created(cluster, tmp_path):
    s = _json_sections()
    some = _artifact(Dataset, "s3://kfp/x", tmp_path / "x")
    with pytest.raises(ConfigError, match="training_pod_gpus=1 with nodes=1 x gpus_per_node=2"):
        qc.train_teacher.python_func(manifest=some, dataset=some, params=s["train_teacher"], run=s["run"],
                                     tracking=s["tracking"], model=_artifact(Model, "s3://kfp/m", tmp_path / "m"),
                                     metrics=Metrics(name="m", uri=str(tmp_path / "metrics")), nodes=1,
                                     gpus_per_node=2, pod_gpus=1, image="qfm:x")
    assert cluster.created == []


# The whole path, run here -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_trainjob_trains_the_tiny_demo_with_torchrun_and_the_step_logs_its_metrics(cluster, published, tmp_path,
                                                                                      capsys):
    """One node of 2 GPUs, run here as torchrun would run it on the node: 2 gloo ranks on the CPU."""
    ranks = 2
    sections = {k: v for k, v in load_params(None, overrides=TINY).items() if k in ("train_teacher", "run", "tracking")}
    model = _artifact(Model, "s3://kfp/run/train-teacher/model", tmp_path / "model")
    summary = trainjob.train_on_trainjob(
        "train-teacher", sections, manifest=_artifact(Dataset, published["manifest"], tmp_path / "m"),
        dataset=_artifact(Dataset, published["dataset"], tmp_path / "d"), inputs={}, model=model,
        image="qfm:test", nodes=1, gpus_per_node=ranks, accelerator_type="nvidia.com/gpu", node_selector={},
        tolerations=[], s3_secret="qfm-s3", mlflow_secret="qfm-mlflow", poll_s=1)
    out = capsys.readouterr().out
    [job] = cluster.created
    name = job["metadata"]["name"]
    assert f"created TrainJob {NAMESPACE}/{name}: 1 node(s) x {ranks} nvidia.com/gpu" in out
    assert f"node 0 of 1: torchrun --nproc-per-node={ranks} -m qfm.cli train-teacher --manifest" in out  # node 0's log
    assert f"TrainJob {name}: Running; node-0 Running" in out and f"TrainJob {name} completed" in out
    written = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert summary == written and summary["best_epoch"] == 0 and summary["selected_on"] == "val srcc"
    assert (tmp_path / "model" / "best.safetensors").is_file()  # from S3, where rank 0 wrote it
    # the node's copies and torchrun's scratch folders are gone with the job
    assert not [p.name for p in (tmp_path / "node-tmp").iterdir() if p.name.startswith(("qfm-", "torchelastic_"))]


@pytest.mark.slow
def test_a_failed_trainjob_fails_the_step_with_its_message_and_the_nodes_log(cluster, published, tmp_path):
    sections = {k: v for k, v in load_params(None, overrides=TINY).items() if k in ("train_teacher", "run", "tracking")}
    with pytest.raises(RuntimeError) as failure:
        trainjob.train_on_trainjob(
            "train-teacher", sections, manifest=_artifact(Dataset, "s3://kfp/run/ingest/nothing-here", tmp_path / "m"),
            dataset=_artifact(Dataset, published["dataset"], tmp_path / "d"), inputs={},
            model=_artifact(Model, "s3://kfp/run/train-teacher/model", tmp_path / "model"), image="qfm:test",
            nodes=1, gpus_per_node=1, accelerator_type="nvidia.com/gpu", node_selector={}, tolerations=[],
            s3_secret="qfm-s3", mlflow_secret="qfm-mlflow", poll_s=1)
    message = str(failure.value)
    name = cluster.created[0]["metadata"]["name"]
    assert message.startswith(f"TrainJob {NAMESPACE}/{name} failed (JobSetFailed: jobset failed: node-0 exited")
    assert "--- node-0, last lines ---" in message and "nothing-here" in message  # qfm's own error, from the log
    assert f"the step deletes the TrainJob as it fails, to free its GPUs; `kubectl -n {NAMESPACE} get events`" in message
    assert cluster.deleted == [name] and not (tmp_path / "model").exists()
