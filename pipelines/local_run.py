"""Run the whole pipeline on this machine with kfp.local (SubprocessRunner, use_venv=False): the same
components and DAG as on a cluster, each step a subprocess of the current Python environment.

    python -m pipelines.local_run [--params params.yaml] [--set SECTION.KEY=VALUE ...] [--out DIR]
    python -m pipelines.local_run --study [--rows ROWS.yaml] [--splits split_0,split_1] [...]
    python -m pipelines.local_run --docker IMAGE [...]   # every step in the project image (DockerRunner)

The dataset is `--dataset` or params' ingest.root; with ingest.format 'demo' a missing folder is made with
the built-in demo. Outputs land under OUT/qfm-iqm-<time>/<step>/<output>; platform settings (GPUs, secrets,
volumes) are ignored locally, and the steps read MLflow settings from this process's environment.
`--study` runs the study pipeline (pipelines/qfm_study_pipeline.py) instead: its ParallelFor loops run
here too (kfp.local runs at most two iterations at a time); the report lands under
OUT/qfm-study-<time>/study-report/.
`--docker IMAGE` runs each step in IMAGE with kfp.local's DockerRunner through the Docker API at DOCKER_HOST
(pipelines/docker_runner.py); the dataset is copied under OUT first (the one folder the containers see).
"""

import argparse
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from qfm.errors import DataError, QfmError
from qfm.tracking import PIPELINE_ENV

DEFAULT_OUT = "artifacts/kfp-local"


def prepare_dataset(params: dict, dataset: str | Path | None) -> Path:
    """The dataset folder to import: the given one, else ingest.root (the demo is made there if missing)."""
    from qfm.data.demo import make_demo

    ingest = params["ingest"]
    path = Path(dataset or ingest.root)
    if path.is_dir():
        return path.resolve()
    if dataset is None and ingest.format == "demo":
        demo = params["demo"]  # as `qfm demo-data` (the dvc.yaml stage) makes it
        make_demo(path, **asdict(demo), progress=False)
        return path.resolve()
    raise DataError(f"dataset folder {path} does not exist: pass --dataset DIR or set ingest.root in the params file")


def run_local(params: dict, dataset: Path, out: str | Path, min_val_srcc: float = 0.0,
              docker_image: str | None = None) -> Path:
    """Run the pipeline under kfp.local; returns the run's folder (one subfolder per step). With
    `docker_image`, every step runs in that image (DockerRunner), else as a subprocess of this environment."""
    from pipelines.qfm_pipeline import PIPELINE_NAME, qfm_pipeline, section_arguments

    arguments = section_arguments(params)
    if docker_image is not None:
        dataset = dataset_under(dataset, out)
        arguments["image"] = docker_image
    return _run(qfm_pipeline, PIPELINE_NAME, out, docker_image=docker_image, dataset_uri=str(dataset),
                min_val_srcc=min_val_srcc, **arguments)


def dataset_under(dataset: Path, out: str | Path) -> Path:
    """`dataset` if it lies under `out`, else a fresh copy of it in OUT/datasets/<name> (hard links where the
    file system allows, so no second copy of the images): kfp.local's DockerRunner mounts only the pipeline
    root into the containers."""
    import os
    import shutil

    out, dataset = Path(out).resolve(), Path(dataset).resolve()
    if dataset.is_relative_to(out):
        return dataset
    copy = out / "datasets" / dataset.name

    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(dataset, copy, copy_function=link_or_copy)
    return copy


def run_study_local(params: dict, dataset: Path, out: str | Path, rows_file: str | Path | None = None,
                    splits: list[str] = ()) -> Path:
    """Run the study pipeline under kfp.local; returns the run's folder (the loops' iterations are
    for-loop-N-iteration-I subfolders; the report is in study-report/)."""
    from pipelines.qfm_study_pipeline import STUDY_PIPELINE_NAME, qfm_study_pipeline, study_arguments

    arguments = study_arguments(params, None if rows_file is None else str(rows_file), list(splits))
    return _run(qfm_study_pipeline, STUDY_PIPELINE_NAME, out, dataset_uri=str(dataset), **arguments)


def _run(pipeline, name: str, out: str | Path, docker_image: str | None = None, **arguments) -> Path:
    import contextlib

    from kfp import local

    from pipelines.docker_runner import check_engine, docker_runner, project_image_steps

    out = Path(out).resolve()
    before = set(out.glob(f"{name}-*")) if out.is_dir() else set()
    previous = os.environ.get(PIPELINE_ENV)  # the steps (subprocesses) share one MLflow pipeline-run tag
    os.environ[PIPELINE_ENV] = previous or f"kfp-local-{time.strftime('%Y%m%d-%H%M%S')}"
    if docker_image is None:
        runner, steps = local.SubprocessRunner(use_venv=False), contextlib.nullcontext()
    else:
        check_engine()
        runner, steps = docker_runner(), project_image_steps(docker_image)
    local.init(runner=runner, pipeline_root=str(out), raise_on_error=True)
    try:
        with warnings.catch_warnings(), steps:  # the image is the project image, i.e. this very environment
            warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
            pipeline(**arguments)
    except RuntimeError as exc:  # kfp.local: a task failed; its log (with qfm's message) is printed above
        raise DataError(f"the local pipeline run failed: {exc}") from exc
    finally:
        if previous is None:
            del os.environ[PIPELINE_ENV]
    runs = sorted(set(out.glob(f"{name}-*")) - before)
    if len(runs) != 1:
        raise DataError(f"expected one new run folder under {out}, found {len(runs)}")
    return runs[0]


def main(argv: list[str] | None = None) -> int:
    from qfm.config import load_params

    parser = argparse.ArgumentParser(prog="python -m pipelines.local_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter (repeatable)")
    parser.add_argument("--dataset", help="dataset folder (default: ingest.root)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"local pipeline root (default {DEFAULT_OUT})")
    parser.add_argument("--min-val-srcc", type=float, default=0.0,
                        help="register the student only at this validation SRCC or above")
    parser.add_argument("--docker", metavar="IMAGE",
                        help="run every step in IMAGE through the Docker API at DOCKER_HOST (kfp.local's "
                             "DockerRunner), e.g. localhost/qfm:0.1.0-cuda-<commit> from scripts/build_image.sh")
    parser.add_argument("--study", action="store_true", help="run the study pipeline (rows compared by pairs)")
    parser.add_argument("--rows", help="with --study: rows file (default: baseline and qfm), as for `qfm study`")
    parser.add_argument("--splits", help="with --study: comma-separated split columns (default: all)")
    args = parser.parse_args(argv)
    if (args.rows or args.splits) and not args.study:
        parser.error("--rows and --splits belong to the study pipeline: add --study")
    if args.docker and args.study:
        parser.error("--docker runs the training pipeline; the study pipeline runs only as subprocesses here")
    try:
        params = load_params(args.params, overrides=args.set)
        dataset = prepare_dataset(params, args.dataset)
        started = time.perf_counter()
        if args.study:
            run_dir = run_study_local(params, dataset, args.out, args.rows,
                                      args.splits.split(",") if args.splits else [])
        else:
            run_dir = run_local(params, dataset, args.out, args.min_val_srcc, docker_image=args.docker)
    except QfmError as exc:
        print(f"pipelines.local_run: error: {exc}", file=sys.stderr)
        return 2
    print(f"local pipeline run finished in {time.perf_counter() - started:.1f} s; outputs in {run_dir}")
    if args.study:
        print(f"the study's report: {run_dir / 'study-report' / 'study' / 'study.md'}")
        return 0
    if not (run_dir / "promote").is_dir():
        print(f"promote did not run: the student's validation SRCC is below --min-val-srcc {args.min_val_srcc} "
              f"(see {run_dir / 'train-student'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
