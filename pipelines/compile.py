"""Compile the pipelines to KFP's IR YAML: `python -m pipelines.compile [--output FILE] [--study-output FILE]`.

The committed pipelines/qfm_pipeline.yaml and pipelines/qfm_study_pipeline.yaml are this command's output
(tests check both are up to date).
"""

import argparse
import sys
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "qfm_pipeline.yaml"
STUDY_OUTPUT = Path(__file__).resolve().parent / "qfm_study_pipeline.yaml"


def compile_pipeline(output: str | Path = DEFAULT_OUTPUT) -> Path:
    """Write the pipeline's IR YAML to `output` (parent folders are made); returns the path."""
    from pipelines.qfm_pipeline import qfm_pipeline

    return _compile(qfm_pipeline, output)


def compile_study_pipeline(output: str | Path = STUDY_OUTPUT) -> Path:
    """Write the study pipeline's IR YAML to `output` (parent folders are made); returns the path."""
    from pipelines.qfm_study_pipeline import qfm_study_pipeline

    return _compile(qfm_study_pipeline, output)


def _compile(pipeline, output: str | Path) -> Path:
    from kfp import compiler

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="YAML file to write (default: the committed one)")
    parser.add_argument("--study-output", default=str(STUDY_OUTPUT),
                        help="the study pipeline's YAML file (default: the committed one)")
    args = parser.parse_args(argv)
    print(f"compiled the pipeline to {compile_pipeline(args.output)}")
    print(f"compiled the study pipeline to {compile_study_pipeline(args.study_output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
