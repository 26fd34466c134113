"""The `qfm` command: argument parsing only; every subcommand calls one library function."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from qfm.errors import ConfigError, QfmError
from qfm.storage import is_s3_uri

EXIT_USER_ERROR = 2


def _parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as YAML (so numbers, booleans and lists get their types)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--option '{text}' is not KEY=VALUE (e.g. --option score_column=MOS)")
    return key.strip(), yaml.safe_load(value)


def _sections(args: argparse.Namespace) -> dict:
    """The validated params.yaml sections (defaults without --params), with --set overrides applied."""
    from dataclasses import replace

    from qfm.config import load_params

    params = load_params(getattr(args, "params", None), overrides=getattr(args, "set", None) or [])
    if params["tracking"].enabled and not params["tracking"].pipeline_run:  # group this run's stages in MLflow
        from qfm.tracking import pipeline_run_id

        params["tracking"] = replace(params["tracking"], pipeline_run=pipeline_run_id(params))
    return params


def _workers(text: str) -> int | str:
    """--workers: 'auto' or a whole number of DataLoader worker processes."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither 'auto' nor a whole number") from None


def _pick(flag: object, default: object) -> object:
    """A command-line flag overrides the params file."""
    return default if flag is None else flag


def cmd_ingest(args: argparse.Namespace) -> int:
    from qfm.data.adapters import ADAPTERS
    from qfm.data.splits import SplitProtocol
    from qfm.steps.ingest import REPORT_FILE, ingest

    if args.list_formats:
        for name in sorted(ADAPTERS):
            print(f"{name:10s} {ADAPTERS[name].description}")
        return 0
    params = _sections(args)
    section, splits = params["ingest"], params["splits"]
    fmt = _pick(args.format, section.format if args.params else None)
    root = _pick(args.root, section.root if args.params else None)
    if not fmt or not root or not args.out:
        raise ConfigError("qfm ingest needs --format, --root and --out, or --params with an ingest section "
                          "(see `qfm ingest --help`)")
    started = time.perf_counter()
    if is_s3_uri(root):  # download (only what differs) into the local cache, then ingest that copy
        from qfm.storage.staging import fetch_folder

        root, fetched = fetch_folder(root, _storage(args), what="--root", progress=not args.quiet)
        print(f"fetched {fetched.summary()}")
    protocol = SplitProtocol(n_splits=_pick(args.n_splits, splits.n_splits),
                             test_fraction=_pick(args.test_fraction, splits.test_fraction),
                             val_fraction=_pick(args.val_fraction, splits.val_fraction),
                             seed=_pick(args.split_seed, splits.seed))
    manifest = ingest(fmt, root, args.out, protocol,
                      options=dict(section.options) | dict(_parse_option(o) for o in args.option),
                      skip_invalid=args.skip_invalid or section.skip_invalid, tracking=params["tracking"],
                      progress=not args.quiet)
    meta = manifest.meta
    print(f"ingested {meta['n_images']} images of '{meta['dataset']}' into {Path(args.out) / 'manifest.parquet'} "
          f"({len(manifest.split_columns)} splits, {time.perf_counter() - started:.1f} s)")
    if meta["n_skipped"]:
        print(f"skipped {meta['n_skipped']} rows on request (skip_invalid); the list and reasons are in "
              f"{Path(args.out) / REPORT_FILE}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from qfm.steps.validate import validate

    params = _sections(args)
    limits = params["validate"]
    report_dir = Path(args.report) if args.report else Path(args.manifest if Path(args.manifest).is_dir()
                                                             else Path(args.manifest).parent)
    limits = replace(limits, min_width=_pick(args.min_width, limits.min_width),
                     min_height=_pick(args.min_height, limits.min_height))
    result = validate(args.manifest, report_dir, limits, tracking=params["tracking"], progress=not args.quiet)
    print(result.summary())
    print(f"report: {report_dir / 'validation.html'} (and validation.json)")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from qfm.data.demo import make_demo

    started = time.perf_counter()
    demo = _sections(args)["demo"]
    summary = make_demo(Path(args.out), **(asdict(demo) | {"seed": _pick(args.seed, demo.seed)}))
    print(f"demo dataset written to {args.out} in {time.perf_counter() - started:.1f} s: {summary}")
    return 0


def _split_run(args: argparse.Namespace, params: dict):
    from dataclasses import replace

    run = params["run"]
    return replace(run, split=args.split or run.split, device=args.device or run.device)


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from qfm.steps.teacher import train_teacher

    params = _sections(args)
    summary = train_teacher(args.manifest, args.out, params["train_teacher"], _split_run(args, params),
                            resume=args.resume, progress=not args.quiet, on_epoch=getattr(args, "on_epoch", None),
                            tracking=params["tracking"])
    print(f"teacher: best epoch {summary['best_epoch']} by {summary['selected_on']} = "
          f"{summary['val'][params['train_teacher'].select_metric]:.4f} ({summary['seconds']} s); {args.out}/best.safetensors")
    return 0


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    from qfm.steps.pseudo_label import pseudo_label

    params = _sections(args)
    summary = pseudo_label(args.manifest, args.teacher, args.out, params["pseudo_label"], _split_run(args, params),
                           progress=not args.quiet, tracking=params["tracking"])
    print(f"pseudo-labels: kept {summary['n_kept']} of {summary['n_pool']} pool images "
          f"({summary['n_excluded_heldout_content']} left out as held-out content, "
          f"{summary['n_unreadable']} unreadable); {args.out}/pseudo_labels.parquet")
    return 0


def cmd_build_bank(args: argparse.Namespace) -> int:
    from qfm.steps.bank import build_bank

    params = _sections(args)
    summary = build_bank(args.manifest, args.teacher, args.pseudo, args.out, params["build_bank"],
                         _split_run(args, params), progress=not args.quiet, tracking=params["tracking"])
    print(f"bank: {summary['n_labelled']} labelled + {summary['n_pseudo']} pseudo-labelled images; "
          f"{summary['n_pairs']} '{summary['rule']}' pairs, {summary['anchors_with_partner']} anchors with a "
          f"partner; {args.out}/pairs.parquet")
    return 0


def cmd_train_student(args: argparse.Namespace) -> int:
    from qfm.steps.student import train_student

    params = _sections(args)
    summary = train_student(args.manifest, args.out, params["train_student"], _split_run(args, params),
                            teacher_dir=args.teacher, pseudo_dir=args.pseudo, bank_dir=args.bank,
                            resume=args.resume, progress=not args.quiet, on_epoch=getattr(args, "on_epoch", None),
                            tracking=params["tracking"])
    print(f"student: best epoch {summary['best_epoch']} by {summary['selected_on']}, QCC "
          f"{'on' if summary['qcc'] else 'off'}, {summary['n_pseudo']} pseudo-labelled images "
          f"({summary['seconds']} s); {args.out}/best.safetensors")
    return 0


def cmd_train_final(args: argparse.Namespace) -> int:
    from qfm.steps.final import train_final

    params = _sections(args)
    if args.device:
        params["run"] = replace(params["run"], device=args.device)
    record = train_final(args.manifest, args.out, params, val_fraction=args.val_fraction, seed=args.seed,
                         resume=args.resume, progress=not args.quiet)
    val = record["val"].get("srcc")
    print(f"final model: {record['n_train']} training + {record['n_val']} validation images of "
          f"'{record['dataset']}', {record['chain']}; best epoch {record['best_epoch']} by "
          f"{record['selected_on']} = {val if val is None else format(val, '.4f')}; {args.out}/best.safetensors, "
          f"{args.out}/model.onnx, {args.out}/final.json")
    if args.package:
        from qfm.steps.package import package_model

        written = package_model(args.out, args.package, card_notes=args.card_notes, command=args.command_line)
        print(f"packaged into {args.package}: {', '.join(sorted(p.name for p in written))}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qfm.steps.evaluate import evaluate

    params = _sections(args)
    m = evaluate(args.manifest, args.model, args.out, _split_run(args, params), part=args.part,
                 progress=not args.quiet, tracking=params["tracking"])
    plcc = f"{m['plcc_logistic']:.4f}" if m["plcc_logistic"] is not None else "n/a (fit failed)"
    print(f"{args.part} ({m['n']} images): SRCC {m['srcc']:.4f}, KRCC {m['krcc']:.4f}, PLCC raw {m['plcc_raw']:.4f}, "
          f"PLCC logistic-fitted {plcc}, RMSE raw {m['rmse_raw']:.4f}; {args.out}/metrics.json")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from qfm.steps.promote import promote

    params = _sections(args)
    result = promote(args.model, args.manifest, args.out, params["promote"], _split_run(args, params),
                     eval_dir=args.eval, tracking=replace(params["tracking"], enabled=True), progress=not args.quiet)
    print(f"promote: {result['model_name']} version {result['version']} is {' and '.join(result['aliases'])}; "
          f"{result['reason']}; serve it with: mlflow models serve -m {result['model_uri']} --env-manager local")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from qfm.data.manifest import read_manifest
    from qfm.steps.study import read_rows, run_study

    splits = args.splits.split(",") if args.splits else read_manifest(args.manifest).split_columns
    rows, _ = read_rows(getattr(args, "rows", None))
    if not args.quiet:
        print(f"study: {len(rows)} row(s) x {len(splits)} split(s), {args.jobs} job(s); one line per finished unit "
              "(split, row, unit, epoch chosen and its val SRCC, test SRCC, seconds)", flush=True)
    study = run_study(args.manifest, args.out, splits, rows_file=getattr(args, "rows", None), params_file=args.params,
                      overrides=args.set or [], jobs=args.jobs, units_dir=args.units, progress=not args.quiet)
    _print_study_rows(study)
    print(f"best row by median val SRCC: {study['best_row_by_val']}; {args.out}/study.md, study.json, "
          f"study_differences.png ({study['wall_seconds']} s)")
    failed = [(e["row"], s) for e in study["rows"] for s in e["errors"]]
    if failed:
        print(f"qfm study: {len(failed)} row/split run(s) failed (see study.md): {failed}", file=sys.stderr)
        return 1
    return 0


def _print_study_rows(study: dict) -> None:
    """One line per row: its medians and, against the reference, the mean test SRCC difference with the
    headline interval (corrected resampled t, 95%)."""
    from qfm.eval.paired import HEADLINE

    for entry in study["rows"]:
        test, val = entry["test_srcc"], entry["val_srcc"]
        line = (f"{entry['row']}: test SRCC median {_number(test['median'])} (mean {_number(test['mean'])}), "
                f"val SRCC median {_number(val['median'])} over {len(entry['splits_done'])} split(s)")
        vs = entry.get("vs_reference", {}).get("test_srcc")
        if vs and vs["n"]:
            ci = vs.get("ci_corrected")
            line += (f"; vs {study['reference']}: {vs['mean']:+.4f} mean difference, " +
                     (f"{HEADLINE} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"{HEADLINE}: n/a (part sizes unknown)"))
        print(line)


def cmd_study_summary(args: argparse.Namespace) -> int:
    from qfm.steps.study import resummarize

    study = resummarize(args.study, train_images=args.train_images, reference=args.reference)
    _print_study_rows(study)
    print(f"best row by median val SRCC: {study['best_row_by_val']}; rewrote {args.study}/study.json, study.md, "
          f"study_differences.png (per-image bootstrap: {study['resummarized']['image_bootstrap']})")
    return 0


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def cmd_score(args: argparse.Namespace) -> int:
    from qfm.packaged import model_scale, packaged_model, with_mos
    from qfm.steps.score import score_images, write_scores

    model = args.model if args.model is not None else packaged_model(args.engine)  # the pretrained model
    frame = score_images(model, args.paths, device=args.device or "auto", batch_size=args.batch_size,
                         workers=args.workers, progress=not args.quiet, engine=args.engine)
    scale = model_scale(args.model)  # the training set's score scale, where the model records it
    if scale is not None:
        frame = with_mos(frame, *scale)
    written = write_scores(frame, args.out)
    if args.out:
        print(f"scored {int(frame['error'].isna().sum())} images into {written}")
    else:
        print(written, end="")
    bad = frame[frame["error"].notna()]
    if len(bad):
        listed = "\n".join(f"  - {p}: {e}" for p, e in zip(bad["path"], bad["error"]))
        print(f"qfm score: {len(bad)} image(s) could not be read (listed in the output with their error):\n{listed}",
              file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qfm.export import export_model

    started = time.perf_counter()
    if args.int8:
        return _export_int8(args, started)
    meta = export_model(args.model, args.format, args.out, opset=args.opset)
    size = Path(args.out).stat().st_size / 1e6
    print(f"exported {args.model} as {args.format} to {args.out} ({size:.1f} MB, {time.perf_counter() - started:.1f} s): "
          f"input uint8 (N, {meta['qfm.input_size'].replace('x', ', ')}, 3) crops, one score per crop; crop grid "
          f"{meta['qfm.crop_grid']}, an image's score is the mean over its crops")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from qfm.train.checkpoint import convert_checkpoint

    sources = [Path(s) for s in args.checkpoint]
    if args.out and len(sources) > 1:
        raise ConfigError("--out names one file: convert one checkpoint at a time with --out, or leave it out")
    for source in sources:
        if source.is_dir():
            raise ConfigError(f"{source} is a folder: give the .pt files to convert (e.g. {source / 'best.pt'} "
                              f"{source / 'last.pt'})")
        out = convert_checkpoint(source, args.out, trust=args.trust)
        print(f"converted {source} -> {out} (and {out.name}.sha256)")
    return 0


def _export_int8(args: argparse.Namespace, started: float) -> int:
    """--int8: the fp32 ONNX export, quantised and gated on the validation part (qfm.quantize)."""
    import tempfile

    from qfm.export import export_model
    from qfm.quantize import quantize_int8

    if args.format != "onnx" or not args.calibrate:
        raise ConfigError("--int8 needs --format onnx and --calibrate MANIFEST (its --split's train images "
                          "calibrate, its validation images decide whether int8 is good enough)")
    with tempfile.TemporaryDirectory(prefix="qfm-export-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_model(args.model, "onnx", fp32, opset=args.opset)
        result = quantize_int8(fp32, args.out, args.calibrate, args.split, args.calibration_images, args.max_loss)
    figures = (f"validation SRCC on {args.split} ({result.n_val} images): fp32 {result.val_srcc_fp32:.4f}, int8 "
               f"{result.val_srcc_int8:.4f} (loss {result.loss:+.4f}; calibrated on {result.n_calibration} train "
               "images)")
    if not result.kept:
        print(f"qfm export: int8 not written: it loses more than {args.max_loss} SRCC; {figures}. Use the fp32 "
              "export (qfm export without --int8).", file=sys.stderr)
        return 1
    size = Path(args.out).stat().st_size / 1e6
    print(f"exported {args.model} as int8 ONNX to {args.out} ({size:.1f} MB, {time.perf_counter() - started:.1f} s); "
          f"{figures}")
    return 0


def _step_parser(sub, name: str, help_text: str, description: str, func, inputs: list[tuple[str, str]],
                 out_help: str, resume: bool = False) -> argparse.ArgumentParser:
    step = sub.add_parser(name, help=help_text, description=description)
    for flag, text in inputs:
        step.add_argument(flag, required=flag in ("--manifest", "--teacher", "--model"), help=text)
    step.add_argument("--out", required=True, help=out_help)
    step.add_argument("--params", metavar="FILE", help="read parameters from this params.yaml")
    step.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                      help="override one parameter (repeatable), e.g. train_student.lambda_qcc=0")
    step.add_argument("--split", help="split column to use (default: run.split, split_0)")
    step.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    if resume:
        step.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors if it exists")
    _storage_flags(step)
    step.add_argument("--quiet", action="store_true", help="no progress bars")
    step.set_defaults(func=func)
    return step


def _add_training_steps(sub) -> None:
    manifest = ("--manifest", "folder of manifest.parquet (from qfm ingest)")
    teacher = ("--teacher", "folder of the trained teacher (from qfm train-teacher)")
    _step_parser(sub, "train-teacher", "train the teacher with the plain DEIQT recipe",
                 "Train on the split's train part; choose the epoch on its val part (never test). Writes "
                 "OUT/best.safetensors, OUT/last.safetensors (a checkpoint each epoch; --resume continues it), history.json, "
                 "training_curves.png, summary.json.", cmd_train_teacher, [manifest],
                 "output folder", resume=True)
    _step_parser(sub, "pseudo-label", "DLE: the teacher pseudo-labels the unlabelled pool",
                 "Score the unlabelled pool (pseudo_label.pool) with the frozen teacher: multi-crop mean as "
                 "the score, crop spread as uncertainty; keep the confident ones. Pool images of held-out "
                 "content are left out. Writes OUT/pseudo_labels.parquet and summary.json.", cmd_pseudo_label,
                 [manifest, teacher], "output folder")
    _step_parser(sub, "build-bank", "SNM: feature bank and noise-partner mining",
                 "Embed every training image (labelled train part + kept pseudo-labels; never val or test) "
                 "with the frozen teacher, index with faiss, mine partners under build_bank.rule. Writes "
                 "OUT/index.faiss, embeddings.npy, bank.parquet, pairs.parquet, summary.json.", cmd_build_bank,
                 [manifest, teacher, ("--pseudo", "folder of pseudo-labels (from qfm pseudo-label)")],
                 "output folder")
    _step_parser(sub, "train-student", "QCC: train the deployed student",
                 "Train the student on the train part plus kept pseudo-labels with the QCC consistency loss "
                 "on SNM partners (and optional contrastive and distillation terms); epoch chosen on val.",
                 cmd_train_student, [manifest, ("--teacher", "teacher folder (distillation)"),
                                     ("--pseudo", "pseudo-label folder (DLE)"), ("--bank", "bank folder (SNM)")],
                 "output folder", resume=True)
    evaluate = _step_parser(sub, "evaluate", "test a trained model: SRCC, KRCC, PLCC (raw and fitted), RMSE",
                            "Deterministic multi-crop test on one part of the split. Writes OUT/metrics.json, "
                            "predictions.csv and scatter.png.", cmd_evaluate,
                            [manifest, ("--model", "folder of a trained model (best.safetensors)")], "output folder")
    evaluate.add_argument("--part", default="test", choices=["test", "val", "train"], help="which part (default test)")
    _step_parser(sub, "promote", "register the student in MLflow; gate the champion alias",
                 "Register the trained student (--model) as a version of promote.model_name (pyfunc: images in, scores "
                 "out), alias it 'challenger', and 'champion' only if its validation promote.metric beats the "
                 "champion's by promote.margin on the same data (else the champion stays; the reason is the "
                 "version's qfm.promotion tag). MLflow at $MLFLOW_TRACKING_URI, else tracking.uri. Writes "
                 "OUT/promotion.json.", cmd_promote,
                 [manifest, ("--model", "folder of the trained student (best.safetensors, summary.json)"),
                  ("--eval", "folder of its evaluation (test metrics shown on the version)")], "output folder")
    for name, help_text, description in (
            ("study", "rows of parameter overrides on several splits, compared by pairs with a reference row",
             ("Train and test every row of --rows (name: overrides) on every split: teacher, DLE, SNM, student "
             "and evaluation, sharing the units rows have in common and reusing finished ones on a rerun (a "
             "unit whose parameters, data or code changed is recomputed). Then each row's per-split "
             "differences with the reference row, with 95% intervals, Wilcoxon p and a per-image bootstrap. "
             "Writes OUT/study.json, study.md, study_differences.png.")),
            ("protocol", "the ten-split protocol: the QFM student against the plain baseline",
             ("`qfm study` with the default rows: 'baseline' (every QFM part off, the plain DEIQT fine-tune) "
             "as the reference and 'qfm' (the parameters as given). Writes OUT/study.json, study.md, "
             "study_differences.png."))):
        study = sub.add_parser(name, help=help_text, description=description)
        study.add_argument("--manifest", required=True, help="folder of manifest.parquet (from qfm ingest)")
        if name == "study":
            study.add_argument("--rows", help="YAML: rows (name: {section.key: value}) and reference (a row "
                                              "name; default the first row); default: baseline and qfm")
        study.add_argument("--splits", help="comma-separated split columns (default: all of the manifest's)")
        study.add_argument("--out", required=True, help="output folder for study.json, study.md and the plot")
        study.add_argument("--units", help="folder of the units of work (default OUT/units); studies that share "
                                           "it share their units (teachers, pools, banks, models)")
        study.add_argument("--params", metavar="FILE", help="read parameters from this params.yaml")
        study.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                           help="override one parameter for every row (repeatable)")
        study.add_argument("--jobs", type=int, default=1, help="splits run side by side in this many processes "
                                                                "(torch threads split between them)")
        study.add_argument("--quiet", action="store_true", help="no progress lines")
        study.set_defaults(func=cmd_study)
    summary = sub.add_parser("study-summary", help="recompute a finished study's statistics from its study.json",
                             description="Recompute the paired statistics of a `qfm study` output folder from the "
                                         "per-split figures its study.json recorded (no training), and rewrite "
                                         "study.json, study.md and study_differences.png there. The per-image "
                                         "bootstrap is recomputed when the predictions.csv files are found, else "
                                         "kept as stored.")
    summary.add_argument("study", help="the folder `qfm study --out` wrote (holds study.json)")
    summary.add_argument("--train-images", type=int, help="labelled train images per split, for a study.json "
                                                          "whose results do not record n_train (older studies)")
    summary.add_argument("--reference", metavar="ROW", help="compare every row with this row instead of the "
                                                             "study's reference (the rows file's)")
    summary.set_defaults(func=cmd_study_summary)
    score = sub.add_parser("score", help="score image files or folders with a trained model",
                           description="Quality scores in [0, 1] (higher = better) by the deterministic multi-crop "
                                       "test; where the model records its training set's score scale (the "
                                       "packaged model, a qfm train-final folder), also mos: the score on that "
                                       "scale, named in the mos_scale column. Unreadable images are listed with "
                                       "their error and make the exit code 1; none is skipped silently.")
    score.add_argument("paths", nargs="+", help="image files and/or folders")
    score.add_argument("--model", help="default: the pretrained model packaged with qfm (qfm/pretrained, see its "
                                       "MODEL_CARD.md); or a trained model folder, its best.safetensors, or a registered model "
                                                       "models:/NAME@ALIAS (MLflow at $MLFLOW_TRACKING_URI); with "
                                                       "--engine onnxruntime a .onnx file from qfm export, or a "
                                                       "folder holding model.onnx")
    score.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch",
                       help="torch (default: the checkpoint) or onnxruntime (an ONNX export, on the CPU); the same "
                            "crops, averaging and table")
    score.add_argument("--out", help="output .csv or .json (default: CSV on standard output)")
    score.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    score.add_argument("--workers", type=_workers, default="auto",
                       help="decoding worker processes of the torch engine, or auto (default: none on a CPU "
                            "under 8 cores); the onnxruntime engine decodes in its own process")
    score.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    score.add_argument("--quiet", action="store_true", help="no progress bars")
    score.set_defaults(func=cmd_score)
    convert = sub.add_parser("convert", help="rewrite pickled .pt checkpoints of an earlier qfm as safetensors",
                             description="Read a pickled checkpoint (best.pt, last.pt) with torch's weights-only "
                                         "loader, which refuses anything that could run code, and write it as a "
                                         "safetensors checkpoint beside it (best.safetensors and its .sha256), "
                                         "which qfm loads without unpickling.")
    convert.add_argument("checkpoint", nargs="+", help="the .pt files to convert")
    convert.add_argument("--out", help="the file to write (one checkpoint only; default: beside it, .safetensors)")
    convert.add_argument("--trust", action="store_true",
                         help="unpickle fully (for a file you made yourself that the weights-only loader refuses)")
    convert.set_defaults(func=cmd_convert)
    export = sub.add_parser("export", help="export a trained model to ONNX or TorchScript",
                            description="Write a trained model as one file that scores without qfm's training code: "
                                        "input uint8 RGB crops (N, H, W, 3) with a dynamic N, normalised inside the "
                                        "graph; output one score per crop (an image's score is the mean over its "
                                        "test-grid crops). The crop grid, input size, score scale, training data "
                                        "version and validation metrics go into the ONNX metadata (metadata_props) "
                                        "or the TorchScript extra file qfm.json. Score an ONNX file with "
                                        "qfm score --engine onnxruntime.")
    export.add_argument("--model", required=True, help="a trained model folder (best.safetensors) or its best.safetensors")
    export.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="onnx or torchscript")
    export.add_argument("--out", required=True, help="the file to write, e.g. artifacts/student/model.onnx")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export.add_argument("--int8", action="store_true",
                        help="write onnxruntime's static int8 form instead, only if its validation SRCC is within "
                             "--max-loss of the fp32 model's (else nothing is written and the exit status is 1)")
    export.add_argument("--calibrate", metavar="MANIFEST",
                        help="with --int8: the manifest whose --split train images calibrate and whose validation "
                             "images judge the int8 model")
    export.add_argument("--split", default="split_0", help="with --int8: the split to use (default split_0)")
    export.add_argument("--calibration-images", type=int, default=64,
                        help="with --int8: train images to calibrate on (default 64)")
    export.add_argument("--max-loss", type=float, default=0.005,
                        help="with --int8: the largest validation SRCC loss accepted (default 0.005)")
    export.set_defaults(func=cmd_export)


S3_FOLDER_INPUTS = ("manifest", "teacher", "pseudo", "bank", "model", "eval")
S3_FOLDER_OUT = {"ingest", "demo-data", "train-teacher", "pseudo-label", "build-bank", "train-student", "evaluate",
                 "promote"}


def _add_final_step(sub) -> None:
    final = sub.add_parser(
        "train-final", help="train the model to ship: the recipe on all labelled images",
        description="Train the params file's recipe (the train_student section, with the chain its QFM parts "
                    "need) on all of the manifest's labelled images, except a seeded, content-disjoint "
                    "validation part used only to choose the epoch (there is no test part: measure a recipe "
                    "with qfm study first). Writes OUT/data (the manifest with the split column 'final'), "
                    "OUT/best.safetensors, last.safetensors, history.json, summary.json, model.onnx and "
                    "final.json. Gate it with qfm promote --model OUT --manifest OUT/data --split final.")
    final.add_argument("--manifest", required=True, help="folder of manifest.parquet (from qfm ingest)")
    final.add_argument("--out", required=True, help="output folder")
    final.add_argument("--val-fraction", type=float,
                       help="share of the content kept to choose the epoch (default: final.val_fraction, 0.1)")
    final.add_argument("--seed", type=int, help="seed of the validation carve (default: final.seed, 2024)")
    final.add_argument("--params", metavar="FILE", help="read parameters from this params.yaml")
    final.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override one parameter (repeatable), e.g. run.threads=1")
    final.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    final.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoints if they exist")
    final.add_argument("--package", metavar="DIR",
                       help="then write the packaged model into DIR (model.safetensors, model.onnx, "
                            "pretrained.json, MODEL_CARD.md; qfm/pretrained for the model qfm ships)")
    final.add_argument("--card-notes", metavar="FILE",
                       help="with --package: a Markdown file about the data (source, licence notice, "
                            "citation) put into the model card")
    final.add_argument("--command-line", metavar="TEXT",
                       help="with --package: the command that rebuilds the package, quoted in the card")
    final.add_argument("--quiet", action="store_true", help="no progress bars")
    final.set_defaults(func=cmd_train_final)


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths (default: storage.endpoint_url, "
                                               "else $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--cache", help="local mirror of s3:// folders (default: storage.cache, .qfm-cache)")


def _storage(args: argparse.Namespace):
    """Transfer settings: flags over params.yaml's storage section; credentials from the AWS settings."""
    from qfm.storage.staging import Storage

    params = _sections(args)["storage"]
    return Storage(endpoint_url=getattr(args, "endpoint_url", None) or params.endpoint_url,
                   cache=Path(getattr(args, "cache", None) or params.cache), workers=params.workers,
                   max_attempts=params.max_attempts)


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand. s3:// input folders are fetched into the cache first; an s3:// --out folder is written
    there and uploaded after the step (training checkpoints after every epoch; --resume starts from S3)."""
    inputs = [n for n in S3_FOLDER_INPUTS if is_s3_uri(getattr(args, n, None))]
    out_on_s3 = args.command in S3_FOLDER_OUT and is_s3_uri(getattr(args, "out", None))
    unsupported = [n for n, v in vars(args).items()
                   if is_s3_uri(v) and n not in inputs and n != "root" and not (n == "out" and out_on_s3)]
    if unsupported:
        flag = unsupported[0].replace("_", "-")
        raise ConfigError(f"qfm {args.command} --{flag} cannot be an s3:// URI; write locally and upload, or use "
                          "an s3:// --out folder, --root of ingest or an input folder (--manifest, --teacher, ...)")
    if not inputs and not out_on_s3:
        return args.func(args)
    from qfm.storage.staging import StagedOutput, fetch_folder

    storage = _storage(args)
    for name in inputs:
        local, fetched = fetch_folder(getattr(args, name), storage, what=f"--{name}",
                                      progress=not getattr(args, "quiet", False))
        print(f"fetched {fetched.summary()}")
        setattr(args, name, str(local))
    if not out_on_s3:
        return args.func(args)
    if _rank() != "0":  # under torchrun rank 0 stages, resumes and uploads; the other ranks write nothing
        with tempfile.TemporaryDirectory(prefix="qfm-rank-") as scratch:
            args.out = scratch
            return args.func(args)
    staged = StagedOutput(args.out, storage, resume=getattr(args, "resume", False),
                          progress=not getattr(args, "quiet", False))
    if staged.fetched is not None:
        print(f"fetched {staged.fetched.summary()}")
    args.out, args.on_epoch = str(staged.local), staged.push
    code = args.func(args)
    if code == 0:
        print(f"uploaded {staged.push().summary()}")
    return code


class _VersionAction(argparse.Action):
    """--version: the package version and the commit, looked up only when asked (git runs outside the image)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from qfm.version import version_string

        print(version_string())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qfm",
        description="QFM-IQM: train, evaluate, register and serve a no-reference image quality model. "
                    "Each subcommand is one pipeline step; `qfm STEP --help` explains it.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the package version and the git commit of this code, and exit")
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
    _storage_flags(ingest)
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
        description="Make the demo dataset from photographs that ship inside installed wheels: each "
                    "distorted with several types at several levels, scored 0-100 by a simulated opinion "
                    "(half the level, half SSIM against the reference; synthetic, not human scores), plus an "
                    "unlabelled pool for pseudo-labelling. Deterministic for a seed. Ingest it with --format demo.")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, help="random seed (default 0)")
    demo.add_argument("--params", metavar="FILE", help="read defaults from this params.yaml (flags override)")
    demo.set_defaults(func=cmd_demo_data)
    _add_training_steps(sub)
    _add_final_step(sub)
    return parser


def _rank() -> str:
    """This process's rank under torchrun ('0' outside it)."""
    return os.environ.get("RANK", "0")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qfm` command; user errors print one clear message and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except QfmError as exc:
        where = f" (rank {_rank()} of {os.environ['WORLD_SIZE']})" if "WORLD_SIZE" in os.environ else ""
        print(f"qfm {args.command}{where}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"qfm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
