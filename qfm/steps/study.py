"""study: rows of parameter overrides trained and tested on the same splits, compared by pairs.

A row is a name and overrides (``section.key: value``) of the study's parameters. On each split a row runs
the training chain: the teacher, then either a plain fine-tune (a row with every QFM part off) or DLE
pseudo-labels, the SNM bank and the QCC student, then the test evaluation. Each piece is a unit of
qfm.steps.units, keyed by its fingerprint, so rows share what they have in common (one teacher per split,
one pool, one bank per bank setting; a plain row whose recipe equals the teacher's *is* the teacher) and a
rerun recomputes only what changed.

Every row is compared with the reference row on the same splits (qfm.eval.paired); the best row is the one
with the best median validation SRCC over the splits every row finished, never chosen on test. The headline
interval of a difference is the corrected resampled t-interval (qfm.eval.paired). Outputs: study.json,
study.md and study_differences.png; resummarize recomputes them from a study.json's per-split figures.

The Kubeflow study pipeline (pipelines/qfm_study_pipeline.py) calls the same pieces one by one: shared_units
per split, run_row_safely per split and row, then summarize and write_study.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from qfm.config import PseudoLabelParams, StudentParams, TrainParams, load_params
from qfm.data.manifest import read_manifest
from qfm.errors import ConfigError, QfmError
from qfm.eval.paired import BOOTSTRAP_MIN_SPLITS, HEADLINE, image_bootstrap, paired_differences
from qfm.eval.report import paired_differences_plot
from qfm.runtime import available_cores, set_threads
from qfm.steps.bank import build_bank
from qfm.steps.common import write_json
from qfm.steps.evaluate import evaluate
from qfm.steps.pseudo_label import SYNTHETIC, pseudo_label
from qfm.steps.student import train_student, uses_pseudo_labels, uses_qcc
from qfm.steps.teacher import train_teacher
from qfm.steps.units import (
    UnitStore,
    check_code,
    code_context,
    data_version,
    device_key,
    git_state,
    pool_sha256,
    unit_key,
    weights_sha256,
)

#: Student overrides that switch every QFM part off: the plain DEIQT fine-tune (the default reference).
PLAIN = {"train_student.qcc": False, "train_student.use_pseudo_labels": False, "train_student.lambda_kd": 0.0,
         "train_student.lambda_con": 0.0}
DEFAULT_ROWS = {"baseline": PLAIN, "qfm": {}}
COMPARED = ("srcc", "plcc_raw", "plcc_logistic")
EXECUTION_ONLY = ("workers",)
STUDY_FILES = ("study.json", "study.md", "study_differences.png")
UNIT_FAILURES = "failed_rows.json"  # in the pipeline's units of a split: {row: error} of rows whose units failed


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]      # SECTION.KEY=VALUE, applied after the study's own --set overrides


def read_rows(path: str | Path | None) -> tuple[list[Row], str]:
    """The rows of a rows file and the reference row's name.

    The file: ``rows:`` a mapping of row name to overrides (``section.key: value``, an empty mapping for
    none) and optionally ``reference:`` a row name (default: the first row). Without a file: 'baseline'
    (every QFM part off) as the reference and 'qfm' (the parameters as given).
    """
    if path is None:
        return parse_rows({"rows": DEFAULT_ROWS, "reference": "baseline"}, "the default rows")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"rows file {path} does not exist")
    return parse_rows(yaml.safe_load(path.read_text()) or {}, str(path))


def parse_rows(data: object, where: str) -> tuple[list[Row], str]:
    """The rows and the reference of a rows mapping (a rows file's content); errors name `where`."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), dict) or not data["rows"]:
        raise ConfigError(f"{where}: needs 'rows:', a mapping of row name to overrides (section.key: value)")
    unknown = sorted(set(data) - {"rows", "reference"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; use 'rows' and 'reference'")
    rows = []
    for name, overrides in data["rows"].items():
        overrides = overrides or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: row '{name}' must map section.key to a value, got {overrides!r}")
        for key in overrides:
            if key.startswith("run."):
                raise ConfigError(f"{where}: row '{name}' sets '{key}'; the splits and the device are the "
                                  "study's (--splits, --set run.device=...), not a row's")
        rows.append(Row(str(name), tuple(f"{k}={json.dumps(v)}" for k, v in overrides.items())))
    reference = str(data.get("reference", rows[0].name))
    if reference not in {r.name for r in rows}:
        raise ConfigError(f"{where}: reference '{reference}' is not one of the rows {[r.name for r in rows]}")
    return rows, reference


def rows_mapping(rows: list[Row], reference: str) -> dict:
    """The rows file's content for these rows (parse_rows reads it back to the same rows)."""
    return {"rows": {r.name: {k: json.loads(v) for k, v in (o.split("=", 1) for o in r.overrides)}
                     for r in rows}, "reference": reference}


def row_params(params_file: str | Path | None, overrides: list[str], row: Row) -> dict:
    """The validated parameters of one row (a bad override is named with its row)."""
    try:
        return load_params(params_file, [*overrides, *row.overrides])
    except ConfigError as exc:
        raise ConfigError(f"row '{row.name}': {exc}") from exc


def _payload(section) -> dict:
    return {k: v for k, v in asdict(section).items() if k not in EXECUTION_ONLY}


def recipe_of(student: StudentParams) -> TrainParams:
    """The student's training recipe alone (what a plain fine-tune with these settings uses)."""
    return TrainParams(**{f.name: getattr(student, f.name) for f in fields(TrainParams)})


def is_plain(student: StudentParams) -> bool:
    """No QFM part is on: no QCC, no pseudo-labels, no distillation, no contrastive term."""
    return not uses_qcc(student) and not uses_pseudo_labels(student) and student.lambda_kd == 0


def _quiet(unit) -> None:
    pass


def _inputs(section, manifest_dir: str | Path) -> dict:
    """The SHA-256 of the files a section reads besides the manifest's images: the weights file of
    model_options.weights (a hub or packaged name is keyed by the parameters and library versions), the DLE
    pool's listing and images (a synthetic pool comes from the training images, keyed by the data)."""
    found = {}
    weights = (getattr(section, "model_options", None) or {}).get("weights")
    if weights:
        found["weights"] = weights_sha256(str(weights))
    if isinstance(section, PseudoLabelParams) and section.pool and section.pool != SYNTHETIC:
        found["pool"] = pool_sha256(manifest_dir, section.pool)
    return found


def _with_inputs(payload: dict, section, manifest_dir: str | Path) -> dict:
    inputs = _inputs(section, manifest_dir)
    return payload | {"inputs": inputs} if inputs else payload


def unit_plan(manifest_dir: str | Path, params: dict, key: Callable[[str, Mapping], str]) -> dict[str, tuple]:
    """The units one row runs on a split, by role in running order: 'teacher', then 'pseudo' and 'bank'
    where the row's student uses them (the units rows share), 'model' and 'test'; each a (kind, payload).
    key(kind, payload) (UnitStore.key) gives the keys that later payloads name. Nothing is computed here but
    the input files' digests."""
    teacher_params, student = params["train_teacher"], params["train_student"]
    pool_params, bank_params = params["pseudo_label"], params["build_bank"]
    plan: dict[str, tuple] = {}
    keys: dict[str, str] = {}

    def add(role: str, kind: str, payload: dict) -> None:
        plan[role] = (kind, payload)
        keys[role] = key(kind, payload)

    add("teacher", "train", _with_inputs({"params": _payload(teacher_params)}, teacher_params, manifest_dir))
    if is_plain(student):
        recipe = recipe_of(student)
        add("model", "train", _with_inputs({"params": _payload(recipe)}, recipe, manifest_dir))
    else:
        if pool_params.pool and (uses_pseudo_labels(student) or uses_qcc(student) and bank_params.include_pseudo):
            add("pseudo", "pseudo", _with_inputs({"params": _payload(pool_params), "teacher": keys["teacher"]},
                                                 pool_params, manifest_dir))
        if uses_qcc(student):
            add("bank", "bank", {"params": _payload(bank_params), "teacher": keys["teacher"],
                                 "pseudo": keys.get("pseudo") if bank_params.include_pseudo else None})
        payload = {"params": _payload(student), "teacher": keys["teacher"] if student.lambda_kd > 0 else None,
                   "pseudo": keys.get("pseudo") if uses_pseudo_labels(student) else None,
                   "bank": keys.get("bank")}
        add("model", "student", _with_inputs(payload, student, manifest_dir))
    add("test", "evaluate", {"model": keys["model"], "part": "test"})
    return plan


def row_keys(manifest_dir: str | Path, params: dict, context: Mapping) -> dict[str, str]:
    """The key of every unit one row uses on a split in a study of this context, by role (unit_plan's),
    computed without running anything."""
    plan = unit_plan(manifest_dir, params, lambda kind, payload: unit_key(context, kind, payload))
    return {role: unit_key(context, kind, payload) for role, (kind, payload) in plan.items()}


SHARED = ("teacher", "pseudo", "bank")


def _compute(role: str, manifest_dir, params: dict, run, done: dict, payload: dict) -> tuple[Callable, bool]:
    """How to compute the unit of `role` from the units `done` before it: (compute(out, resume), resumable)."""
    student = params["train_student"]
    teacher = done.get("teacher")
    if role == "teacher" or role == "model" and is_plain(student):
        recipe = params["train_teacher"] if role == "teacher" else recipe_of(student)
        return (lambda out, resume: train_teacher(manifest_dir, out, recipe, run, resume=resume,
                                                  progress=False)), True
    if role == "pseudo":
        return (lambda out, resume: pseudo_label(manifest_dir, teacher.path, out, params["pseudo_label"], run,
                                                 progress=False)), False
    if role == "bank":
        bank_pool = done["pseudo"] if payload["pseudo"] else None
        return (lambda out, resume: build_bank(manifest_dir, teacher.path, bank_pool.path if bank_pool else None,
                                               out, params["build_bank"], run, progress=False)), False
    if role == "model":
        pool = done["pseudo"] if payload["pseudo"] else None
        bank = done["bank"] if payload["bank"] else None
        return (lambda out, resume: train_student(
            manifest_dir, out, student, run, teacher_dir=teacher.path, pseudo_dir=pool.path if pool else None,
            bank_dir=bank.path if bank else None, resume=resume, progress=False)), True
    model = done["model"]
    return (lambda out, resume: evaluate(manifest_dir, model.path, out, run, progress=False)), False


def _run_units(units: UnitStore, manifest_dir, params: dict, split: str, roles: tuple[str, ...],
               report: Callable[[object], None], done: dict | None = None) -> dict:
    run = replace(params["run"], split=split)
    done = dict(done or {})
    for role, (kind, payload) in unit_plan(manifest_dir, params, units.key).items():
        if role not in roles or role in done:
            continue
        compute, resumable = _compute(role, manifest_dir, params, run, done, payload)
        done[role] = units.run(kind, payload, compute, resumable=resumable)
        report(done[role])
    return done


def shared_units(units: UnitStore, manifest_dir: str | Path, params: dict, split: str,
                 report: Callable[[object], None] = _quiet) -> dict:
    """The units of one row on one split that other rows may share: the teacher, and the DLE pool and the
    SNM bank where the row's student uses them; returns them by kind ('teacher', 'pseudo', 'bank')."""
    return _run_units(units, manifest_dir, params, split, SHARED, report)


def run_row(units: UnitStore, manifest_dir: str | Path, params: dict, split: str,
            report: Callable[[object], None]) -> dict:
    """The training chain of one row on one split; returns its units, validation and test figures."""
    shared = shared_units(units, manifest_dir, params, split, report)
    done = _run_units(units, manifest_dir, params, split, ("model", "test"), report, shared)
    model, test = done["model"], done["test"]
    chain = {kind: unit.key for kind, unit in shared.items()} | {"model": model.key}
    return {"units": chain, "best_epoch": model.result["best_epoch"], "val": model.result["val"],
            "test": test.result, "predictions": str(test.path / "predictions.csv"),
            "n_train": model.result.get("n_train", model.result.get("n_labelled"))}


def _progress_line(split: str, row: str, unit) -> str:
    result = unit.result
    bits = [f"{split:>9}", f"{row:<16}", f"{unit.kind}-{unit.key[:8]}"]
    if "best_epoch" in result:
        bits.append(f"epoch {result['best_epoch']} val SRCC {result['val'].get('srcc', float('nan')):.4f}")
    if "srcc" in result:
        bits.append(f"test SRCC {result['srcc']:.4f}")
    bits.append("reused" if unit.reused else f"{unit.seconds:.0f} s")
    return "  ".join(bits)


def progress_reporter(split: str, row: str, progress: bool) -> Callable[[object], None]:
    """A report callback printing one line per finished unit (or nothing without progress)."""
    return (lambda unit: print(_progress_line(split, row, unit), flush=True)) if progress else _quiet


def run_split(manifest_dir: str, units_dir: str, params_file: str | None, overrides: list[str], rows: list[Row],
              split: str, context: dict, threads: int, progress: bool) -> dict[str, dict]:
    """Every row on one split (one process of the study); a row that fails is recorded, not fatal. Refuses
    (CodeChangedError) to start a row when the qfm code on disk is no longer the study's (`context`)."""
    set_threads(threads)
    results = {}
    with UnitStore(Path(units_dir) / split, context) as units:
        for row in rows:
            check_code(context)  # this process runs the code on disk: it must be the code the keys name
            results[row.name] = run_row_safely(units, manifest_dir, params_file, overrides, row, split, progress)
    return results


def run_row_safely(units: UnitStore, manifest_dir: str, params_file: str | None, overrides: list[str], row: Row,
                   split: str, progress: bool) -> dict:
    """run_row with the row's parameters; a failure is returned as {'error': ...} (printed with progress)."""
    started = time.perf_counter()

    report = progress_reporter(split, row.name, progress)
    try:
        result = run_row(units, manifest_dir, row_params(params_file, overrides, row), split, report)
        result["seconds"] = round(time.perf_counter() - started, 1)
    except Exception as exc:  # noqa: BLE001 -- one row failing must not lose the others; the error is reported
        result = {"error": failure_text(exc)}
    if "error" in result and progress:
        print(f"{split:>9}  {row.name:<16}  FAILED: {result['error'].splitlines()[0]}", flush=True)
    return result


def failure_text(exc: Exception) -> str:
    """How a failed row is recorded: a QfmError's own message, else the end of the traceback (call it in the
    except block that caught exc)."""
    return str(exc) if isinstance(exc, QfmError) else traceback.format_exc(limit=4)


def run_study(manifest_dir: str | Path, out_dir: str | Path, splits: list[str], *, rows_file: str | Path | None = None,
              params_file: str | Path | None = None, overrides: list[str] = (), jobs: int = 1,
              units_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run every row on every split (splits side by side in `jobs` processes), then compare each row with
    the reference by pairs; writes study.json, study.md and study_differences.png into out_dir. Units live
    in units_dir (default out_dir/units); studies that share it share their units."""
    rows, reference = read_rows(rows_file)
    overrides = list(overrides)
    params = {row.name: row_params(params_file, overrides, row) for row in rows}  # every row checked up front
    columns = read_manifest(manifest_dir).split_columns
    missing = [s for s in splits if s not in columns]
    if missing:
        raise ConfigError(f"split(s) {missing} are not in the manifest; it has {columns}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = study_context(manifest_dir, params[reference]["run"].device)
    source = git_state()
    jobs = min(jobs, len(splits))
    threads = params[reference]["run"].threads or max(1, available_cores() // jobs)
    started = time.perf_counter()
    units_dir = Path(units_dir) if units_dir is not None else out_dir / "units"
    job = (str(manifest_dir), str(units_dir), None if params_file is None else str(params_file), overrides, rows)
    if jobs == 1:
        per_split = {s: run_split(*job, s, context, threads, progress) for s in splits}
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {s: pool.submit(run_split, *job, s, context, threads, progress) for s in splits}
            per_split = {s: f.result() for s, f in futures.items()}
    study = summarize(rows, reference, per_split, params)
    study |= {"context": context, "source": source, "splits": splits, "jobs": jobs, "threads_per_job": threads,
              "wall_seconds": round(time.perf_counter() - started, 1),
              "command": {"rows_file": None if rows_file is None else str(rows_file),
                          "params_file": None if params_file is None else str(params_file), "overrides": overrides}}
    write_study(out_dir, study)
    return study


def study_context(manifest_dir: str | Path, device: str) -> dict:
    """What keys every unit besides its own payload (qfm.steps.units.scoped_context): the data version, the
    code version of each unit kind, the device (device_key); and the digest of every module and library
    version behind the code versions (not keyed: it names what changed when a worker finds other code)."""
    return {"data": data_version(manifest_dir), **code_context(), "device": device_key(device)}


def write_study(out_dir: str | Path, study: dict) -> None:
    """study.json, study.md and study_differences.png of a summarized study into out_dir."""
    out_dir = Path(out_dir)
    write_json(out_dir / "study.json", study)
    (out_dir / "study.md").write_text(study_markdown(study))
    paired_differences_plot(out_dir / "study_differences.png", study)


def _metric(result: dict, part: str, metric: str) -> float | None:
    value = result.get(part, {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _predictions(result: dict) -> pd.DataFrame:
    return pd.read_csv(result["predictions"]).set_index("image_id")


def _positive_int(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def part_sizes(per_split: Mapping[str, Mapping[str, dict]], reference: str) -> dict[str, dict]:
    """Per split, the number of images the models were fitted on ('train'), selected on ('val') and tested
    on ('test'), from the reference's result (else any finished row's); None where a result lacks it.

    'train' is the split's labelled train part (a result's ``n_train``: the teacher's or plain row's train
    set, a student's labelled images). That is what the corrected resampled t-interval needs: the images
    drawn from the population that a model was fitted on, which overlap between resampled splits.
    Pseudo-labelled copies a DLE student also trains on are made from those same images, not new draws,
    and validation images only choose the epoch, so neither counts.
    """
    def first(done: list[dict], get: Callable[[dict], int | None]) -> int | None:
        return next((v for v in map(get, done) if v is not None), None)

    sizes = {}
    for split, results in per_split.items():
        done = [results[reference]] if "test" in results.get(reference, {}) else []
        done += [r for r in results.values() if "test" in r]
        sizes[split] = {"train": first(done, lambda r: _positive_int(r.get("n_train"))),
                        "val": first(done, lambda r: _positive_int(r.get("val", {}).get("n"))),
                        "test": first(done, lambda r: _positive_int(r["test"].get("n")))}
    return sizes


def correction_ratio(sizes: Mapping[str, dict], splits: list[str]) -> float | None:
    """n_test / n_train of these splits for the corrected interval: the mean of the splits' own ratios (the
    ratio itself when the splits' parts are equal, as the manifest's fractions make them); None when a
    split's sizes are unknown."""
    ratios = [sizes[s]["test"] / sizes[s]["train"] for s in splits
              if sizes.get(s, {}).get("train") and sizes.get(s, {}).get("test")]
    return float(np.mean(ratios)) if ratios and len(ratios) == len(splits) else None


def summarize(rows: list[Row], reference: str, per_split: Mapping[str, Mapping[str, dict]],
              params: dict | None = None, *, images: bool = True) -> dict:
    """Per row: medians and means of its figures; against the reference: paired differences on the splits
    both finished, with the corrected resampled t-interval (the headline), the plain t-interval, the
    bootstrap over splits, the exact Wilcoxon p and (with `images`) the per-image bootstrap; the best row
    by median val SRCC over the splits every row that finished any split finished. `params` is unused (the
    figures are in the results); it is accepted for the callers that pass it."""
    splits = list(per_split)
    sizes = part_sizes(per_split, reference)
    summary_rows = []
    for row in rows:
        done = {s: per_split[s][row.name] for s in splits if "test" in per_split[s].get(row.name, {})}
        entry: dict = {"row": row.name, "overrides": dict(o.split("=", 1) for o in row.overrides),
                       "splits_done": list(done),
                       "errors": {s: per_split[s][row.name]["error"] for s in splits
                                  if "error" in per_split[s].get(row.name, {})}}
        for part, metrics in (("val", ("srcc", "plcc_raw")), ("test", COMPARED)):
            for metric in metrics:
                values = [v for v in (_metric(r, part, metric) for r in done.values()) if v is not None]
                entry[f"{part}_{metric}"] = {"median": float(np.median(values)) if values else None,
                                             "mean": float(np.mean(values)) if values else None,
                                             "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                                             "per_split": {s: _metric(r, part, metric) for s, r in done.items()}}
        if row.name != reference:
            entry["vs_reference"] = _paired(per_split, splits, row.name, reference, sizes, images)
        summary_rows.append(entry)
    best, common, unranked = _best_by_val(summary_rows, splits)
    return {"reference": reference, "best_row_by_val": best, "ranked_on_splits": common, "not_ranked": unranked,
            "headline": HEADLINE, "part_sizes": sizes, "rows": summary_rows, "per_split": per_split,
            "notes": [("test figures are reported, never used to choose; the epoch of every model and the best "
                      "row are chosen on validation SRCC, on the splits every ranked row finished"),
                      "plcc_raw: Pearson on raw predictions; plcc_logistic: after the 4-parameter logistic fit",
                      "differences are row minus reference on the same splits; intervals are 95%",
                      (f"headline interval: {HEADLINE} (Nadeau and Bengio 2003), mean +- t(n-1) * sqrt((1/n + "
                       "n_test/n_train) * s^2), n_train the labelled train images a model was fitted on; the plain "
                       "t-interval assumes independent splits and is too narrow for resampled ones; the bootstrap "
                       f"over splits is descriptive below {BOOTSTRAP_MIN_SPLITS} splits"),
                      "Wilcoxon p is exact on the non-zero differences; zeros are dropped and counted"]}


def _best_by_val(entries: list[dict], splits: list[str]) -> tuple[str | None, list[str], list[str]]:
    """The row with the best median val SRCC over the splits every ranked row has a val SRCC on; rows that
    finished no split are not ranked (they would leave no split to compare on)."""
    ranked = [e for e in entries if any(v is not None for v in e["val_srcc"]["per_split"].values())]
    common = [s for s in splits if all(e["val_srcc"]["per_split"].get(s) is not None for e in ranked)]
    unranked = [e["row"] for e in entries if e not in ranked]
    if not ranked or not common:
        return None, common, unranked
    best = max(ranked, key=lambda e: np.median([e["val_srcc"]["per_split"][s] for s in common]))
    return best["row"], common, unranked


def _paired(per_split, splits: list[str], row: str, reference: str, sizes: Mapping[str, dict],
            images: bool = True) -> dict:
    both = [s for s in splits if "test" in per_split[s].get(row, {}) and "test" in per_split[s].get(reference, {})]
    ratio = correction_ratio(sizes, both)
    out: dict = {"splits": both, "test_train_ratio": ratio, "headline": HEADLINE}
    for part, metrics in (("val", ("srcc",)), ("test", COMPARED)):
        for metric in metrics:
            pairs = [(_metric(per_split[s][row], part, metric), _metric(per_split[s][reference], part, metric))
                     for s in both]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            out[f"{part}_{metric}"] = paired_differences([a for a, _ in pairs], [b for _, b in pairs],
                                                         test_train_ratio=ratio)
    if not images:
        return out
    found = []
    for s in both:
        a, b = _predictions(per_split[s][row]), _predictions(per_split[s][reference])
        b = b.loc[a.index]
        found.append((a["mos"].to_numpy(), a["prediction"].to_numpy(), b["prediction"].to_numpy()))
    if found:
        out["image_bootstrap"] = {m: image_bootstrap(found, m) for m in ("srcc", "plcc_raw")}
    return out


def resummarize(study_dir: str | Path, *, train_images: int | None = None, reference: str | None = None) -> dict:
    """Recompute a finished study's statistics from the per-split figures in its study.json (no training)
    and rewrite study.json, study.md and the plot.

    ``reference``: compare every row with this row instead of the study's own reference (a stored per-image
    bootstrap, made against the old reference, is then dropped when the predictions are not found).

    ``train_images``: the labelled train images per split, for a study.json written before the results
    recorded ``n_train`` (a recorded size that differs is refused; without it, the train sizes of an earlier
    re-summary's ``part_sizes`` are used). The per-image bootstrap is recomputed
    when every predictions.csv is found (as recorded, or relative to the study folder); otherwise the stored
    per-image bootstrap is kept as it was, and ``resummarized.image_bootstrap`` says so.
    """
    study_dir = Path(study_dir)
    path = study_dir / "study.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give the folder `qfm study --out` wrote")
    old = json.loads(path.read_text())
    missing = sorted({"reference", "rows", "per_split", "splits"} - set(old))
    if missing:
        raise ConfigError(f"{path}: not a study summary (no {missing})")
    if train_images is not None and (not isinstance(train_images, int) or train_images < 1):
        raise ConfigError(f"--train-images must be a positive whole number, got {train_images!r}")
    per_split = json.loads(json.dumps(old["per_split"]))
    for split, results in per_split.items():
        for name, result in results.items():
            if "test" not in result:
                continue
            recorded = _positive_int(result.get("n_train"))
            summarized = _positive_int((old.get("part_sizes") or {}).get(split, {}).get("train"))
            if recorded is None and (train_images or summarized):  # given now, or at an earlier re-summary
                result["n_train"] = train_images or summarized
            elif recorded is not None and train_images is not None and recorded != train_images:
                raise ConfigError(f"{path}: row '{name}' on {split} records n_train {recorded}, not --train-images "
                                  f"{train_images}; leave --train-images out")
    rows = [Row(e["row"], tuple(f"{k}={v}" for k, v in e.get("overrides", {}).items())) for e in old["rows"]]
    names = [row.name for row in rows]
    if reference is not None and reference not in names:
        raise ConfigError(f"--reference {reference!r} is not a row of {path}; its rows: {', '.join(names)}")
    reference = reference or old["reference"]
    same_reference = reference == old["reference"]
    located = {}
    for split, results in per_split.items():
        for name, result in results.items():
            if "predictions" in result:
                recorded = Path(result["predictions"])
                candidates = [recorded] if recorded.is_absolute() else [study_dir / recorded, recorded]
                located[(split, name)] = next((c for c in candidates if c.is_file()), None)
    images = bool(located) and all(p is not None for p in located.values())
    if images:
        for (split, name), found in located.items():
            per_split[split][name]["predictions"] = str(found)
    study = summarize(rows, reference, per_split, images=images)
    study["per_split"] = old["per_split"]  # as recorded (paths and all); sizes given here are in part_sizes
    if not images and same_reference:
        stored = {e["row"]: e.get("vs_reference", {}).get("image_bootstrap") for e in old["rows"]}
        for entry in study["rows"]:
            if entry.get("vs_reference") is not None and stored.get(entry["row"]):
                entry["vs_reference"]["image_bootstrap"] = stored[entry["row"]]
    kept = {k: v for k, v in old.items() if k not in study and k != "resummarized"}
    study |= kept
    how = "recomputed"
    if not images and not same_reference:
        how = "left out: its predictions.csv files were not found, and the stored one compares with another row"
    elif not images:
        how = "stored, as the study's own code computed it (its predictions.csv files were not found)"
        kept_boots = [b for boots in stored.values() if boots for b in boots.values()]
        if any("n_degenerate" not in b for b in kept_boots):
            how += "; that code scored a degenerate draw as a zero difference instead of dropping it"
    study["resummarized"] = {"command": "qfm study-summary", "train_images": train_images, "image_bootstrap": how,
                             "reference": None if same_reference else reference, "study_reference": old["reference"]}
    write_study(study_dir, study)
    return study


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _ci(interval: list[float] | None) -> str:
    return "n/a" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def _sizes_line(study: dict) -> str:
    sizes = study.get("part_sizes") or {}
    seen = {(v.get("train"), v.get("val"), v.get("test")) for v in sizes.values()}
    if len(seen) == 1 and None not in next(iter(seen)):
        train, val, test = next(iter(seen))
        return (f"Parts per split: {train} train / {val} val / {test} test images; n_test/n_train = "
                f"{test}/{train} = {test / train:.3f}.")
    return "Parts per split: " + "; ".join(
        f"{s} {v.get('train') or '?'} train / {v.get('val') or '?'} val / {v.get('test') or '?'} test"
        for s, v in sizes.items()) + " (? unknown: no corrected interval on that split)."


def _image_cell(boot: dict | None) -> str:
    if not boot:
        return ""
    cell = f"{_fmt(boot['mean'], True)} {_ci(boot['ci'])}"
    return cell + (f", {boot['n_degenerate']} degenerate draws dropped" if boot.get("n_degenerate") else "")


def study_markdown(study: dict) -> str:
    """The study's tables: each row's own figures, then its paired differences with the reference."""
    ref, best = study["reference"], study["best_row_by_val"]
    n = len(study["splits"])
    ranked_on = study.get("ranked_on_splits", study["splits"])
    headline = study.get("headline", HEADLINE)
    lines = [f"# Study: {len(study['rows'])} rows on {n} splits ({', '.join(study['splits'])})", "",
             (f"Reference row: `{ref}`. Best row by median validation SRCC over the splits every ranked row "
              f"finished ({', '.join(ranked_on) or 'none'}): `{best}` (chosen on validation only).")]
    if study.get("not_ranked"):
        lines.append(f"Not ranked (no finished split): {', '.join(f'`{r}`' for r in study['not_ranked'])}.")
    lines += ["", (f"Headline interval: **{headline}** (Nadeau and Bengio 2003): mean ± t(n-1) · sqrt((1/n + "
                   "n_test/n_train) · s²), n_train the labelled train images each model was fitted on. Resampled "
                   "splits share most of their training images, so the plain t-interval (independent splits) is "
                   f"too narrow; the bootstrap over splits is descriptive below {BOOTSTRAP_MIN_SPLITS} splits. "
                   + _sizes_line(study)),
              "", "## Each row (median over splits; mean ± std of test SRCC)", "",
              "| row | splits | val SRCC | test SRCC | test PLCC raw | test PLCC fitted | test SRCC mean ± std |",
              "|---|---|---|---|---|---|---|"]
    for e in study["rows"]:
        std = e["test_srcc"]["std"]
        mean = f"{_fmt(e['test_srcc']['mean'])} ± {_fmt(std)}" if std is not None else _fmt(e["test_srcc"]["mean"])
        mark = " (best on val)" if e["row"] == best else ""
        lines.append(f"| {e['row']}{mark} | {len(e['splits_done'])} | {_fmt(e['val_srcc']['median'])} | "
                     f"{_fmt(e['test_srcc']['median'])} | {_fmt(e['test_plcc_raw']['median'])} | "
                     f"{_fmt(e['test_plcc_logistic']['median'])} | {mean} |")
    descriptive = n < BOOTSTRAP_MIN_SPLITS
    lines += ["", f"## Paired differences with `{ref}` (row minus reference, same splits)", "",
              (f"| row | metric | splits | mean | median | 95% CI {headline.removesuffix(', 95%')} (headline) | "
               "95% CI plain t | 95% CI bootstrap over splits" + (" (descriptive)" if descriptive else "") +
               " | Wilcoxon p (exact) | zeros | wins/losses | per-image bootstrap mean [95% CI] |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    labels = {"val_srcc": "val SRCC", "test_srcc": "test SRCC", "test_plcc_raw": "test PLCC raw",
              "test_plcc_logistic": "test PLCC fitted"}
    for e in study["rows"]:
        vs = e.get("vs_reference")
        if not vs:
            continue
        for key, label in labels.items():
            d = vs[key]
            boot = vs.get("image_bootstrap", {}).get(key.removeprefix("test_")) if key.startswith("test") else None
            p = "n/a" if d["wilcoxon_p"] is None else f"{d['wilcoxon_p']:.3f}"
            lines.append(f"| {e['row']} | {label} | {d['n']} | {_fmt(d['mean'], True)} | {_fmt(d['median'], True)} "
                         f"| {_ci(d.get('ci_corrected'))} | {_ci(d['ci_t'])} | {_ci(d['ci_bootstrap'])} | {p} | "
                         f"{d.get('wilcoxon_zeros', d['ties'])} | {d['wins']}/{d['losses']} | {_image_cell(boot)} |")
    failed = [(e["row"], s, err.splitlines()[0]) for e in study["rows"] for s, err in e["errors"].items()]
    if failed:
        lines += ["", "## Failed", ""] + [f"- `{r}` on {s}: {err}" for r, s, err in failed]
    lines += ["", "Notes: " + "; ".join(study["notes"]) + ". The per-image bootstrap resamples each split's test "
              "images (the same draw for both rows) and averages the difference over splits: it measures the "
              "test-sample noise for these trained models, not the training noise the split-level intervals "
              "include; a draw whose metric is undefined on some split is dropped and counted."]
    again = study.get("resummarized")
    if again:
        lines += ["", "Statistics recomputed from the recorded per-split figures (`qfm study-summary OUT"
                  + (f" --train-images {again['train_images']}" if again.get("train_images") else "")
                  + (f" --reference {again['reference']}" if again.get("reference") else "") + "`); "
                  f"per-image bootstrap: {again['image_bootstrap']}."]
    lines.append("")
    return "\n".join(lines)
