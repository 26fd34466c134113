"""Compile the pipelines to KFP's IR YAML: `python -m pipelines.compile [--output FILE] [--study-output FILE]
[--image REGISTRY/qfm:0.1.0-cuda]`.

The committed pipelines/qfm_pipeline.yaml and pipelines/qfm_study_pipeline.yaml are this command's output
without --image (tests check both are up to date); their `image` parameter has the unkeyed default
qfm:0.1.0-cuda, to be set when a run is created. With --image the compiled default is that image keyed on
this checkout's commit (REGISTRY/qfm:0.1.0-cuda-<commit12>, the tag scripts/build_image.sh gives), so
KFP's cache, whose key includes each step's image parameter, never returns results of other code.
"""

import argparse
import sys
from pathlib import Path

from qfm.errors import QfmError

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "qfm_pipeline.yaml"
STUDY_OUTPUT = Path(__file__).resolve().parent / "qfm_study_pipeline.yaml"


def compile_pipeline(output: str | Path = DEFAULT_OUTPUT, image: str | None = None,
                     commit: str | None = None) -> Path:
    """Write the pipeline's IR YAML to `output` (parent folders are made); returns the path. With `image`,
    the `image` parameter's default is that image keyed on `commit` (default: this checkout's)."""
    from pipelines.qfm_pipeline import qfm_pipeline

    return _compile(qfm_pipeline, output, image, commit)


def compile_study_pipeline(output: str | Path = STUDY_OUTPUT, image: str | None = None,
                           commit: str | None = None) -> Path:
    """Write the study pipeline's IR YAML to `output` (parent folders are made); returns the path; `image`
    and `commit` as for compile_pipeline."""
    from pipelines.qfm_study_pipeline import qfm_study_pipeline

    return _compile(qfm_study_pipeline, output, image, commit)


def _compile(pipeline, output: str | Path, image: str | None = None, commit: str | None = None) -> Path:
    from kfp import compiler

    from qfm.version import keyed_image

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    defaults = None if image is None else {"image": keyed_image(image, commit)}
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(output), pipeline_parameters=defaults)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="YAML file to write (default: the committed one)")
    parser.add_argument("--study-output", default=str(STUDY_OUTPUT),
                        help="the study pipeline's YAML file (default: the committed one)")
    parser.add_argument("--image", help="default image of the steps, keyed on this checkout's commit "
                                         "(e.g. REGISTRY/qfm:0.1.0-cuda -> REGISTRY/qfm:0.1.0-cuda-<commit12>)")
    args = parser.parse_args(argv)
    try:
        print(f"compiled the pipeline to {compile_pipeline(args.output, args.image)}")
        print(f"compiled the study pipeline to {compile_study_pipeline(args.study_output, args.image)}")
    except QfmError as exc:
        print(f"pipelines.compile: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
