"""The Kubeflow pipeline: compile and round-trip, what the compiled spec asks of Kubernetes, the committed YAML,
`pipelines.submit` without a cluster, the Dockerfile, and the whole DAG under kfp.local on the tiny demo."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest
import yaml
from kfp import compiler, components
from test_kfp_components import TINY

from pipelines import submit
from pipelines.compile import DEFAULT_OUTPUT, compile_pipeline
from pipelines.qfm_pipeline import SECTIONS

REPO = Path(__file__).resolve().parents[1]
GPU_STEPS = {"train-teacher", "pseudo-label", "build-bank", "train-student", "evaluate"}
TRAINING_STEPS = {"train-teacher", "train-student"}  # their own pod, or the launcher of a TrainJob
QFM_STEPS = GPU_STEPS | {"ingest", "validate", "promote"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict, dict]:
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "qfm_pipeline.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())
    return path, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_yaml_round_trips_through_kfps_loader(compiled, tmp_path):
    path, spec, _ = compiled
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "qfm-iqm"
    compiler.Compiler().compile(loaded, str(tmp_path / "again.yaml"))
    assert list(yaml.safe_load_all((tmp_path / "again.yaml").read_text())) == list(yaml.safe_load_all(path.read_text()))
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(SECTIONS) <= set(inputs) and "default" not in inputs["dataset_uri"]
    assert json.loads(inputs["train_student"]["defaultValue"])["epochs"] == 4  # sections travel as JSON text


def test_committed_yaml_is_up_to_date(compiled):
    # parsed, not as text: kfp's header comment prints dict defaults in protobuf's (unstable) key order
    committed = list(yaml.safe_load_all(DEFAULT_OUTPUT.read_text()))
    assert committed == list(yaml.safe_load_all(compiled[0].read_text())), \
        "pipelines/qfm_pipeline.yaml is stale: run `python -m pipelines.compile` and commit the result"


def test_gpu_steps_request_accelerators_placement_and_shared_memory(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    for step in QFM_STEPS:
        container, k8s = executors[f"exec-{step}"]["container"], platform[f"exec-{step}"]
        assert container["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}"
        if step in GPU_STEPS:
            count = "training_pod_gpus" if step in TRAINING_STEPS else "gpu_count"
            assert container["resources"]["accelerator"] == {
                "resourceCount": f"{{{{$.inputs.parameters['pipelinechannel--{count}']}}}}",
                "resourceType": "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}"}
            assert k8s["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": "gpu_node_selector"}}
            assert k8s["tolerations"] == [{"tolerationJson": {"componentInputParameter": "gpu_tolerations"}}]
            assert k8s["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "2Gi",
                                              "volumeName": "dshm"}]
        else:
            assert "resources" not in container and "nodeSelector" not in k8s and "emptyDirMounts" not in k8s
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["gpu_tolerations"]["defaultValue"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                            "effect": "NoSchedule"}]


def test_training_steps_get_the_trainjob_layout_and_the_same_image_secrets_and_placement(compiled):
    _, spec, _ = compiled
    tasks, inputs = spec["root"]["dag"]["tasks"], spec["root"]["inputDefinitions"]["parameters"]
    assert {name: inputs[name]["defaultValue"] for name in ("gpu_count", "nodes", "gpus_per_node", "training_pod_gpus")} \
        == {"gpu_count": 1, "nodes": 1, "gpus_per_node": 1, "training_pod_gpus": 1}  # one node, one GPU: own pod
    wanted = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "pod_gpus": "training_pod_gpus", "image": "image",
              "gpu_resource": "accelerator_type", "node_selector": "gpu_node_selector",
              "tolerations": "gpu_tolerations", "s3_secret": "s3_secret", "mlflow_secret": "mlflow_secret"}
    for step in TRAINING_STEPS:
        given = tasks[step]["inputs"]["parameters"]
        assert {k: given[k]["componentInputParameter"] for k in wanted} == wanted, step
    for step in GPU_STEPS - TRAINING_STEPS:  # the other GPU steps know nothing of TrainJobs
        assert "nodes" not in tasks[step]["inputs"]["parameters"]


def test_credentials_come_only_from_secrets(compiled):
    path, spec, platform = compiled
    for step in QFM_STEPS:
        by_secret = {}
        for entry in platform[f"exec-{step}"]["secretAsEnv"]:
            # inside the dsl.If (promote) the pipeline parameter reaches the task as pipelinechannel--NAME
            name = entry["secretNameParameter"]["componentInputParameter"].removeprefix("pipelinechannel--")
            envs = {m["envVar"] for m in entry["keyToEnv"]}
            assert all(m["secretKey"] == m["envVar"] for m in entry["keyToEnv"])
            by_secret.setdefault(name, {})[entry["optional"]] = envs
        assert by_secret["s3_secret"][False] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert by_secret["mlflow_secret"][False] == {"MLFLOW_TRACKING_URI"}
        assert "AWS_ENDPOINT_URL" in by_secret["s3_secret"][True]
        assert "env" not in spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]  # no literal values
    text = path.read_text()
    assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?\w{8,}", text)


def test_caching_and_the_promotion_gate(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    for step in QFM_STEPS - {"promote"}:
        assert tasks[step]["cachingOptions"] == {"enableCache": True}
    gate = tasks["condition-1"]
    assert gate["triggerPolicy"]["condition"] == ("inputs.parameter_values['pipelinechannel--train-student-Output'] "
                                                  ">= inputs.parameter_values['pipelinechannel--min_val_srcc']")
    promote = spec["components"]["comp-condition-1"]["dag"]["tasks"]["promote"]
    assert not promote.get("cachingOptions", {}).get("enableCache")
    assert tasks["train-teacher"]["dependentTasks"] == ["importer", "ingest", "validate"]  # gated on validation
    assert set(tasks["train-student"]["dependentTasks"]) == {"importer", "ingest", "train-teacher", "pseudo-label",
                                                             "build-bank"}


# pipelines.submit without a cluster --------------------------------------------------------------------------

class _Recorder(BaseHTTPRequestHandler):
    """Answers 404 to everything and records each request: proves what submit sends before giving up."""

    seen: ClassVar[list[str]] = []

    def _answer(self):
        _Recorder.seen.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def not_kfp():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()
    server.server_close()


def _submit(*extra: str, host: str = "http://127.0.0.1:9") -> list[str]:
    return ["--host", host, "--dataset-uri", "s3://data/demo", "--pipeline-root", "s3://runs/qfm",
            "--image", "registry.example.com/qfm:0.1.0-cuda", "--params", str(REPO / "params.yaml"), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_fails_clearly_when_the_host_is_unreachable(capsys):
    host = f"http://127.0.0.1:{_free_port()}"
    assert submit.main(_submit("--timeout", "2", host=host)) == 2
    err = capsys.readouterr().err
    assert f"cannot reach Kubeflow Pipelines at {host}" in err and "nothing was submitted" in err


def test_submit_checks_every_parameter_before_contacting_the_host(not_kfp, capsys):
    host, seen = not_kfp
    bad = [(["--set", "train_teacher.epochs=two"], "'train_teacher.epochs' must be int"),
           (["--set", "train_student.lamda_qcc=0"], "did you mean 'lambda_qcc'"),
           (["--node-selector", "{gpu: a100}"], "--node-selector is not valid JSON"),
           (["--tolerations", "{}"], "--tolerations must be a JSON list"),
           (["--gpu-count", "-1"], "--gpu-count must be 0 or more"),
           (["--gpu-count", "4"], "--gpu-count 4: a step's pod trains and scores in one process on one GPU"),
           (["--gpu-count", "4"], "--nodes N --gpus-per-node G for data-parallel training"),
           (["--nodes", "0"], "--nodes must be 1 or more, got 0"),
           (["--gpus-per-node", "-2"], "--gpus-per-node must be 1 or more, got -2"),
           (["--nodes", "2", "--gpu-count", "0"], "--nodes 2 --gpus-per-node 1 trains on GPUs, but --gpu-count 0"),
           (["--gpus-per-node", "2", "--pipeline-root", "gs://runs/qfm"],
            "--pipeline-root 'gs://runs/qfm': a TrainJob's pods read and write the artifacts over S3")]
    for extra, message in bad:
        assert submit.main(_submit(*extra, host=host)) == 2
        assert message in capsys.readouterr().err
    args = _submit(host=host)
    args[args.index("--dataset-uri") + 1] = "artifacts/demo"
    assert submit.main(args) == 2
    assert "is not an object-store URI" in capsys.readouterr().err
    assert seen == []  # the host was never contacted
    assert submit.main(_submit(host=host)) == 2  # valid: one probe, refused, nothing created
    assert "is not a Kubeflow Pipelines v2 API endpoint; nothing was submitted" in capsys.readouterr().err
    assert seen == ["GET /apis/v2beta1/healthz"]


def test_submit_dry_run_carries_params_yaml_and_overrides(capsys):
    assert submit.main(_submit("--dry-run", "--set", "train_student.epochs=20", "--node-selector",
                               '{"gpu": "a100"}', "--run-name", "nightly")) == 0
    sent = json.loads(capsys.readouterr().out)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    args = sent["arguments"]
    assert set(SECTIONS) <= set(args)
    assert json.loads(args["train_student"])["epochs"] == 20
    assert json.loads(args["build_bank"])["rule"] == params["build_bank"]["rule"]
    assert json.loads(args["promote"])["model_name"] == params["promote"]["model_name"]
    assert args["gpu_node_selector"] == {"gpu": "a100"} and args["dataset_uri"] == "s3://data/demo"
    assert sent["pipeline_root"] == "s3://runs/qfm" and sent["run_name"] == "nightly" and sent["enable_caching"]
    assert (args["gpu_count"], args["nodes"], args["gpus_per_node"], args["training_pod_gpus"]) == (1, 1, 1, 1)
    with pytest.raises(SystemExit):
        submit.build_parser().parse_args(["--dataset-uri", "s3://d/x"])  # --host and the rest are required


@pytest.mark.parametrize(("extra", "layout"), [
    ([], (1, 1, 1, 1)),                                              # one GPU: the training steps' own pods hold it
    (["--gpu-count", "0"], (0, 1, 1, 0)),                            # the CPU image: no GPU anywhere
    (["--nodes", "2", "--gpus-per-node", "4"], (1, 2, 4, 0)),        # a TrainJob holds 2 x 4; the launcher pods none
    (["--gpus-per-node", "2", "--pipeline-root", "minio://mlpipeline/v2"], (1, 1, 2, 0))])
def test_submit_asks_for_exactly_the_gpus_the_code_uses(extra, layout, capsys):
    assert submit.main(_submit("--dry-run", *extra)) == 0
    args = json.loads(capsys.readouterr().out)["arguments"]
    assert (args["gpu_count"], args["nodes"], args["gpus_per_node"], args["training_pod_gpus"]) == layout


# The Dockerfile (no Docker engine here: check what can be checked) ----------------------------------------

def test_dockerfile_copies_what_exists_and_installs_with_the_constraints(tmp_path):
    text = (REPO / "Dockerfile").read_text()
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.MULTILINE):
        for source in sources.split():
            assert (REPO / source).exists() and source.rstrip("/") in allowed, source
    assert 'ENTRYPOINT ["qfm"]' in text
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["qfm"] == "qfm.cli:main"
    snippet = re.search(r'python -c "(import tomllib;.+?)" > requirements.txt', text).group(1)
    requirements = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.split()
    assert requirements == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (tmp_path / "requirements.txt").write_text("\n".join(requirements))
    # the same install, resolved offline against this venv (built from the same constraints): nothing to change
    check = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-c",
                            str(REPO / "constraints.txt"), "-r", str(tmp_path / "requirements.txt")],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0 and "Would install" not in check.stdout, check.stdout + check.stderr
    pinned = subprocess.run(["grep", "-E", "^(torch|torchvision)==", str(REPO / "constraints.txt")],
                            capture_output=True, text=True, check=True).stdout.split()
    assert [p.split("==")[0] for p in pinned] == ["torch", "torchvision"]  # what the CPU variant fetches


# The whole DAG under kfp.local ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*have no effect in the current local runner:UserWarning")
def test_local_run_of_the_whole_dag_registers_a_model(tiny_demo, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines.local_run import run_local
    from qfm.config import load_params

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the step subprocesses inherit it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see test_kfp_components.one_thread
    monkeypatch.chdir(tmp_path)
    params = load_params(None, overrides=TINY)
    run_dir = run_local(params, tiny_demo.parent / "demo", tmp_path / "kfp")
    steps = {p.name for p in run_dir.iterdir() if p.is_dir()}
    assert QFM_STEPS <= steps
    metrics = json.loads((run_dir / "evaluate" / "results" / "metrics.json").read_text())["metrics"]
    assert metrics["n"] == len(pd.read_csv(run_dir / "evaluate" / "results" / "predictions.csv")) > 0
    promotion = json.loads((run_dir / "promote" / "promotion" / "promotion.json").read_text())
    assert promotion["promoted"] is True and promotion["version"] == 1
    version = MlflowClient(uri).get_model_version_by_alias("qfm-iqm", "champion")
    assert float(version.tags["qfm.test_srcc"]) == pytest.approx(metrics["srcc"])


def test_local_run_command_names_a_missing_dataset(tmp_path, capsys):
    from pipelines import local_run

    assert local_run.main(["--params", str(REPO / "params.yaml"), "--dataset", str(tmp_path / "nowhere")]) == 2
    assert f"dataset folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
