"""Submit the pipeline to a Kubeflow Pipelines cluster:

    python -m pipelines.submit --host URL --dataset-uri s3://... --pipeline-root s3://... --image REG/qfm:TAG
    python -m pipelines.submit ... --study [--rows ROWS.yaml] [--splits split_0,split_1]   (the study pipeline)

Parameters come from params.yaml (plus --set overrides), checked by qfm's schema. Everything is checked
before the cluster is contacted, and the host is probed before anything is created, so a bad parameter
or an unreachable host leaves nothing behind (no experiment, no run).
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from qfm.errors import ConfigError, QfmError

HEALTHZ = "/apis/v2beta1/healthz"
REMOTE_SCHEMES = ("s3", "gs", "minio")


@dataclass(frozen=True)
class Submission:
    """What goes to the cluster: the run's pipeline arguments and where it lands."""

    arguments: dict
    run_name: str
    experiment: str
    pipeline_root: str
    namespace: str | None
    enable_caching: bool
    study: bool = False             # the study pipeline (pipelines/qfm_study_pipeline.py) rather than qfm-iqm


def _remote_uri(flag: str, uri: str) -> str:
    scheme = urlparse(uri).scheme
    if scheme not in REMOTE_SCHEMES or not urlparse(uri).netloc:
        raise ConfigError(f"{flag} {uri!r} is not an object-store URI: a cluster cannot read this machine's files; "
                          f"give {' or '.join(s + '://bucket/path' for s in REMOTE_SCHEMES)}")
    return uri.rstrip("/")


def _json_option(flag: str, text: str, kind: type):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON ({exc}): e.g. {flag} '{'{}' if kind is dict else '[]'}'") from exc
    if not isinstance(value, kind):
        raise ConfigError(f"{flag} must be a JSON {'object' if kind is dict else 'list'}, got {type(value).__name__}")
    return value


def _training_layout(args: argparse.Namespace) -> int:
    """Check --gpu-count, --nodes, --gpus-per-node; returns the GPUs of the training steps' own pods (0 when a
    TrainJob owns them). The pipeline asks for exactly the GPUs the code uses."""
    if args.gpu_count < 0:
        raise ConfigError(f"--gpu-count must be 0 or more, got {args.gpu_count}")
    if args.gpu_count > 1:
        raise ConfigError(f"--gpu-count {args.gpu_count}: a step's pod trains and scores in one process on one GPU, so "
                          "more would be reserved and left idle; use --gpu-count 1 (or 0 for the CPU image), and "
                          "--nodes N --gpus-per-node G for data-parallel training on a Kubeflow Trainer TrainJob")
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{flag} must be 1 or more, got {value} (1 and 1: the training steps run in their own pod)")
    if args.nodes * args.gpus_per_node == 1:
        return args.gpu_count
    if args.gpu_count == 0:
        raise ConfigError(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node} trains on GPUs, but --gpu-count 0 "
                          "means the CPU image; use --gpu-count 1 with the CUDA image")
    for flag, uri in (("--pipeline-root", args.pipeline_root), ("--dataset-uri", args.dataset_uri)):
        if urlparse(uri).scheme not in ("s3", "minio"):
            raise ConfigError(f"{flag} {uri!r}: a TrainJob's pods read and write the artifacts over S3; with --nodes "
                              "or --gpus-per-node above 1 give s3:// or minio:// URIs")
    return 0


def build_submission(args: argparse.Namespace) -> Submission:
    """Check every argument and turn params.yaml into the pipeline's arguments; raises ConfigError."""
    from pipelines.qfm_pipeline import qfm_pipeline, section_arguments
    from pipelines.qfm_study_pipeline import qfm_study_pipeline, study_arguments
    from qfm.config import load_params
    from qfm.version import keyed_image

    if (args.rows or args.splits) and not args.study:
        raise ConfigError("--rows and --splits belong to the study pipeline: add --study")
    params = load_params(args.params, overrides=args.set)
    training_pod_gpus = _training_layout(args)
    if args.study and args.nodes * args.gpus_per_node != 1:
        raise ConfigError(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node}: the study pipeline trains each "
                          "row in its own pod on --gpu-count GPUs (no TrainJob); leave both at 1 with --study")
    if not args.image.strip():
        raise ConfigError("--image is empty: give the pushed project image, e.g. registry.example.com/qfm:0.1.0-cuda")
    arguments = {
        "dataset_uri": _remote_uri("--dataset-uri", args.dataset_uri),
        "image": keyed_image(args.image),  # KFP's cache key includes it: a new commit, a new key
        "accelerator_type": args.accelerator_type,
        "gpu_count": args.gpu_count,
        "gpu_node_selector": _json_option("--node-selector", args.node_selector, dict),
        "gpu_tolerations": _json_option("--tolerations", args.tolerations, list),
        "s3_secret": args.s3_secret,
        "mlflow_secret": args.mlflow_secret,
    }
    if args.study:
        pipeline = qfm_study_pipeline
        arguments |= study_arguments(params, args.rows, args.splits.split(",") if args.splits else [])
    else:
        pipeline = qfm_pipeline
        arguments |= {**section_arguments(params), "min_val_srcc": args.min_val_srcc, "nodes": args.nodes,
                      "gpus_per_node": args.gpus_per_node, "training_pod_gpus": training_pod_gpus}
    unknown = sorted(set(arguments) - set(pipeline.component_spec.inputs))
    if unknown:  # the pipeline and this script disagree: a bug, not a user error, but say it plainly
        raise ConfigError(f"the pipeline has no parameter(s) {unknown}; recompile (python -m pipelines.compile)")
    what = "study" if args.study else params["run"].split
    run_name = args.run_name or f"qfm-{params['ingest'].format}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Submission(arguments=arguments, run_name=run_name, experiment=args.experiment,
                      pipeline_root=_remote_uri("--pipeline-root", args.pipeline_root), namespace=args.namespace,
                      enable_caching=not args.no_cache, study=args.study)


def check_host(host: str, timeout: float) -> str:
    """The host URL after one probe of the KFP API's health endpoint; ConfigError saying why it failed."""
    import requests

    url = host.rstrip("/")
    if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        raise ConfigError(f"--host {host!r} is not an http(s) URL, e.g. http://localhost:8080 after "
                          "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`")
    try:
        response = requests.get(url + HEALTHZ, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise ConfigError(f"cannot reach Kubeflow Pipelines at {url} ({type(exc).__name__}: {exc}); nothing was "
                          "submitted. Check --host, and that the KFP API is reachable from here (port-forward, VPN, "
                          "proxy)") from exc
    if response.status_code in (301, 302, 303, 307, 308, 401, 403):
        raise ConfigError(f"{url} asks for a login (HTTP {response.status_code}): this script talks to an "
                          "unauthenticated KFP API (e.g. a port-forward to svc/ml-pipeline-ui or svc/ml-pipeline); "
                          "nothing was submitted")
    try:
        response.json()
        ok = response.status_code == 200
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{url}{HEALTHZ} answered HTTP {response.status_code} without the KFP health record, so "
                          f"{url} is not a Kubeflow Pipelines v2 API endpoint; nothing was submitted")
    return url


def submit(host: str, submission: Submission, timeout: float = 10.0) -> str:
    """Compile, probe the host, then create the run (and the experiment if new); returns the run id."""
    import kfp
    from kfp_server_api.exceptions import ApiException

    from pipelines.compile import compile_pipeline, compile_study_pipeline

    url = check_host(host, timeout)
    with tempfile.TemporaryDirectory() as tmp:
        package = (compile_study_pipeline if submission.study else compile_pipeline)(Path(tmp) / "pipeline.yaml")
        client = kfp.Client(host=url, namespace=submission.namespace or "kubeflow")
        try:
            result = client.create_run_from_pipeline_package(
                str(package), arguments=submission.arguments, run_name=submission.run_name,
                experiment_name=submission.experiment, namespace=submission.namespace,
                pipeline_root=submission.pipeline_root, enable_caching=submission.enable_caching)
        except ApiException as exc:
            raise ConfigError(f"Kubeflow Pipelines at {url} refused the run (HTTP {exc.status} {exc.reason}): "
                              f"{(exc.body or '').strip()[:500]}") from exc
    return result.run_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Create the secrets first (names: --s3-secret, --mlflow-secret); see "
                                            "docs/kubeflow.md.")
    parser.add_argument("--host", required=True, help="KFP API URL, e.g. http://localhost:8080")
    parser.add_argument("--dataset-uri", required=True, help="the dataset release in object storage, s3://...")
    parser.add_argument("--pipeline-root", required=True, help="where the run's artifacts go, s3://bucket/prefix")
    parser.add_argument("--image", required=True, help="the pushed project image, e.g. REGISTRY/qfm:0.1.0-cuda: used as "
                        "REGISTRY/qfm:0.1.0-cuda-<commit12> of this checkout (scripts/build_image.sh's tag), unless "
                        "it names a commit already or is pinned by digest (@sha256:...)")
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter (repeatable), e.g. train_student.epochs=20")
    parser.add_argument("--experiment", default="qfm", help="experiment name (default qfm; created if new)")
    parser.add_argument("--run-name", help="run name (default qfm-FORMAT-SPLIT-TIME, or qfm-FORMAT-study-TIME)")
    parser.add_argument("--namespace", help="Kubeflow namespace (multi-user deployments)")
    parser.add_argument("--min-val-srcc", type=float, default=0.0,
                        help="register the student only at this validation SRCC or above (not with --study)")
    parser.add_argument("--study", action="store_true",
                        help="submit the study pipeline: rows of overrides compared by pairs, as `qfm study`")
    parser.add_argument("--rows", help="with --study: rows file (default: baseline and qfm)")
    parser.add_argument("--splits", help="with --study: comma-separated split columns (default: all)")
    parser.add_argument("--accelerator-type", default="nvidia.com/gpu", help="GPU resource name")
    parser.add_argument("--gpu-count", type=int, default=1,
                        help="GPUs of each GPU step's pod: 1 (default) or 0 (the CPU image)")
    parser.add_argument("--nodes", type=int, default=1,
                        help="train-teacher and train-student on this many nodes (a Kubeflow Trainer TrainJob when "
                             "nodes x gpus-per-node is above 1; default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=1,
                        help="GPUs (torchrun ranks) per training node (default 1)")
    parser.add_argument("--node-selector", default="{}", help="GPU steps' nodeSelector, JSON object")
    parser.add_argument("--tolerations", default=json.dumps([{"key": "nvidia.com/gpu", "operator": "Exists",
                                                               "effect": "NoSchedule"}]),
                        help="GPU steps' tolerations, JSON list (default: tolerate the nvidia.com/gpu taint)")
    parser.add_argument("--s3-secret", default="qfm-s3", help="Kubernetes secret with the S3 credentials")
    parser.add_argument("--mlflow-secret", default="qfm-mlflow", help="Kubernetes secret with MLFLOW_TRACKING_URI")
    parser.add_argument("--no-cache", action="store_true", help="run every step even where a cached result exists")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the host (default 10)")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the run; contact nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        submission = build_submission(args)
        if args.dry_run:
            print(json.dumps({"host": args.host, **submission.__dict__}, indent=2))
            return 0
        run_id = submit(args.host, submission, args.timeout)
    except QfmError as exc:
        print(f"pipelines.submit: error: {exc}", file=sys.stderr)
        return 2
    print(f"submitted run '{submission.run_name}' (id {run_id}) to experiment '{submission.experiment}' at "
          f"{args.host}; artifacts under {submission.pipeline_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
