"""Compile the pipeline to KFP's IR YAML: `python -m pipelines.compile [--output FILE]`.

The committed pipelines/qfm_pipeline.yaml is this command's output (a test checks it is up to date).
"""

import argparse
import sys
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "qfm_pipeline.yaml"


def compile_pipeline(output: str | Path = DEFAULT_OUTPUT) -> Path:
    """Write the pipeline's IR YAML to `output` (parent folders are made); returns the path."""
    from kfp import compiler

    from pipelines.qfm_pipeline import qfm_pipeline

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=qfm_pipeline, package_path=str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="YAML file to write (default: the committed one)")
    args = parser.parse_args(argv)
    path = compile_pipeline(args.output)
    print(f"compiled the pipeline to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
