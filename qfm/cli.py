"""The `qfm` command: argument parsing only; every subcommand calls one library function."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from qfm.errors import ConfigError, QfmError

EXIT_USER_ERROR = 2


def _parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as YAML (so numbers, booleans and lists get their types)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--option '{text}' is not KEY=VALUE (e.g. --option score_column=MOS)")
    return key.strip(), yaml.safe_load(value)


def _sections(args: argparse.Namespace) -> dict:
    """The validated params.yaml sections when --params is given, else every section's defaults."""
    from qfm.config import SECTIONS, load_params, parse_section

    if getattr(args, "params", None):
        return load_params(args.params)
    return {name: parse_section(name, {}) for name in SECTIONS}


def _pick(flag: object, default: object) -> object:
    """A command-line flag overrides the params file."""
    return default if flag is None else flag


def cmd_ingest(args: argparse.Namespace) -> int:
    from qfm.data.adapters import ADAPTERS, read_dataset
    from qfm.data.manifest import build_manifest, write_manifest
    from qfm.data.splits import SplitProtocol

    if args.list_formats:
        for name in sorted(ADAPTERS):
            print(f"{name:10s} {ADAPTERS[name].description}")
        return 0
    params = _sections(args)
    ingest, splits = params["ingest"], params["splits"]
    fmt = _pick(args.format, ingest.format if args.params else None)
    root = _pick(args.root, ingest.root if args.params else None)
    if not fmt or not root or not args.out:
        raise ConfigError("qfm ingest needs --format, --root and --out, or --params with an ingest section "
                          "(see `qfm ingest --help`)")
    started = time.perf_counter()
    options = dict(ingest.options) | dict(_parse_option(o) for o in args.option)
    try:
        raw = read_dataset(fmt, root, **options)
    except TypeError as exc:  # an option the adapter does not take
        raise ConfigError(f"format '{fmt}' does not take that option: {exc}") from exc
    protocol = SplitProtocol(n_splits=_pick(args.n_splits, splits.n_splits),
                             test_fraction=_pick(args.test_fraction, splits.test_fraction),
                             val_fraction=_pick(args.val_fraction, splits.val_fraction),
                             seed=_pick(args.split_seed, splits.seed))
    skip = args.skip_invalid or ingest.skip_invalid
    manifest = build_manifest(raw, protocol, skip_invalid=skip, progress=not args.quiet)
    path = write_manifest(manifest, args.out)
    meta = manifest.meta
    print(f"ingested {meta['n_images']} images of '{meta['dataset']}' into {path} "
          f"({len(manifest.split_columns)} splits, {time.perf_counter() - started:.1f} s)")
    if meta["n_skipped"]:
        print(f"skipped {meta['n_skipped']} rows on request (skip_invalid); the list and reasons are in "
              f"{Path(args.out) / 'ingest_report.json'}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from qfm.data.manifest import read_manifest
    from qfm.data.validate import raise_if_failed, validate_manifest

    limits = _sections(args)["validate"]
    manifest = read_manifest(args.manifest)
    report_dir = Path(args.report) if args.report else Path(args.manifest if Path(args.manifest).is_dir()
                                                             else Path(args.manifest).parent)
    result = validate_manifest(manifest, min_width=_pick(args.min_width, limits.min_width),
                               min_height=_pick(args.min_height, limits.min_height),
                               report_dir=report_dir, progress=not args.quiet)
    raise_if_failed(result, report_dir)
    print(result.summary())
    print(f"report: {report_dir / 'validation.html'} (and validation.json)")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from qfm.data.demo import make_demo

    started = time.perf_counter()
    seed = _pick(args.seed, _sections(args)["demo"].seed)
    summary = make_demo(Path(args.out), seed=seed)
    print(f"demo dataset written to {args.out} in {time.perf_counter() - started:.1f} s: {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qfm",
        description="QFM-IQM: train, evaluate, register and serve a no-reference image quality model. "
                    "Each subcommand is one pipeline step; `qfm STEP --help` explains it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="STEP")

    ingest = sub.add_parser(
        "ingest", help="read a dataset release into a normalised manifest with ten splits",
        description="Read an IQA dataset in the layout it was published in (or any CSV) and write "
                    "OUT/manifest.parquet (one row per image: path, mos in [0,1] higher=better, the raw "
                    "score, content id, splits split_0..split_9) and OUT/ingest_report.json. Every image is "
                    "decoded once; any bad row stops ingestion with the file or row named, unless "
                    "--skip-invalid is given, in which case the skipped rows are listed in the report.",
        epilog="Example: qfm ingest --format livec --root ChallengeDB_release --out artifacts/ingest\n"
               "         qfm ingest --format csv --root my_photos --out out --option score_min=1 "
               "--option score_max=5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ingest.add_argument("--format", help="dataset format; `qfm ingest --list-formats` lists them")
    ingest.add_argument("--root", help="the dataset's top folder, as released")
    ingest.add_argument("--out", help="output folder for manifest.parquet and ingest_report.json")
    ingest.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an adapter option (repeatable), e.g. score_column=MOS for --format csv")
    ingest.add_argument("--skip-invalid", action="store_true",
                        help="leave out bad rows instead of stopping; each is listed in the report")
    ingest.add_argument("--n-splits", type=int, help="number of train/test splits (default 10)")
    ingest.add_argument("--test-fraction", type=float, help="test share of content (default 0.2)")
    ingest.add_argument("--val-fraction", type=float,
                        help="validation share of the train part, for model selection (default 0.125)")
    ingest.add_argument("--split-seed", type=int, help="seed of the splits (default 2024)")
    ingest.add_argument("--params", metavar="FILE", help="read defaults from this params.yaml (flags override)")
    ingest.add_argument("--list-formats", action="store_true", help="list the known formats and exit")
    ingest.add_argument("--quiet", action="store_true", help="no progress bars")
    ingest.set_defaults(func=cmd_ingest)

    validate = sub.add_parser(
        "validate", help="check a manifest and its images before training (great-expectations suite)",
        description="Run the validation suite on a manifest: required columns, no nulls, unique ids, mos in "
                    "[0,1], raw scores inside the declared range, content-disjoint splits, every image "
                    "present, decodable and large enough. Writes validation.json and validation.html; exits "
                    "2 naming each failed expectation.")
    validate.add_argument("manifest", help="a manifest.parquet or the folder holding it")
    validate.add_argument("--report", help="folder for the report (default: the manifest's folder)")
    validate.add_argument("--min-width", type=int, help="smallest allowed image width (default 224)")
    validate.add_argument("--min-height", type=int, help="smallest allowed image height (default 224)")
    validate.add_argument("--params", metavar="FILE", help="read defaults from this params.yaml (flags override)")
    validate.add_argument("--quiet", action="store_true", help="no progress bars")
    validate.set_defaults(func=cmd_validate)

    demo = sub.add_parser(
        "demo-data", help="make the built-in synthetic demo dataset (no download)",
        description="Make the demo dataset from the photographs that ship inside scikit-image: each "
                    "distorted with several types at several levels, scored by a full-reference measure "
                    "mapped to a 0-100 MOS-like scale (synthetic, not human scores), plus an unlabelled pool "
                    "for pseudo-labelling. Deterministic for a seed. Ingest it with --format demo.")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, help="random seed (default 0)")
    demo.add_argument("--params", metavar="FILE", help="read defaults from this params.yaml (flags override)")
    demo.set_defaults(func=cmd_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qfm` command; user errors print one clear message and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except QfmError as exc:
        print(f"qfm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"qfm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
