"""The validate step: a great-expectations suite run on a manifest, with a JSON and an HTML report.

Every check is a GE expectation in one suite, validated on one batch (the whole manifest frame). Image
files are decoded once (thread pool) and their outcome becomes derived columns of that frame:
``_file_problem`` (null when the file decodes, else the reason), ``_width`` and ``_height``. The
split disjointness check uses ``_parts_<split column>``: the parts (e.g. 'test+train') that hold the
row's content in that split, which GE expects to be a single part name.
great_expectations is imported only when a validation runs: it takes seconds to import.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qfm.data.images import check_image
from qfm.data.manifest import BASE_COLUMNS, Manifest
from qfm.data.splits import PARTS
from qfm.errors import DataError

REPORT_JSON = "validation.json"
REPORT_HTML = "validation.html"
NULLABLE_COLUMNS = frozenset({"mos_std", "distortion_type", "distortion_level"})
INDEX_COLUMNS = ("image_id", "path", "content_id")
MAX_EXAMPLES = 5  # offending rows named in a failure sentence
REPORT_EXAMPLES = 20  # offending rows kept per expectation in the JSON report


@dataclass
class ExpectationOutcome:
    """One named check of the suite and what GE found."""

    name: str
    description: str
    expectation_type: str
    column: str | None
    kwargs: dict
    evaluated: bool = True  # False when a column it needs is missing (that column's own check fails)
    success: bool | None = None
    element_count: int | None = None
    unexpected_count: int | None = None
    observed_value: Any = None
    examples: list[dict] = field(default_factory=list)
    message: str = ""


@dataclass
class ValidationResult:
    """The outcome of validate_manifest: overall success, every check, and timings."""

    success: bool
    dataset: str
    n_rows: int
    outcomes: list[ExpectationOutcome]
    parameters: dict
    seconds: dict
    ge_version: str

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if o.evaluated and not o.success]

    @property
    def counts(self) -> dict[str, int]:
        evaluated = [o for o in self.outcomes if o.evaluated]
        return {"expectations": len(self.outcomes), "evaluated": len(evaluated),
                "passed": sum(bool(o.success) for o in evaluated), "failed": len(self.failed),
                "not_evaluated": len(self.outcomes) - len(evaluated)}

    def summary(self) -> str:
        """A few lines for a terminal: the verdict, the counts and one sentence per failed check."""
        c = self.counts
        verdict = "PASSED" if self.success else "FAILED"
        lines = [f"validation of '{self.dataset}' ({self.n_rows} rows) {verdict}: {c['passed']} of "
                 f"{c['evaluated']} checks passed, {c['failed']} failed"
                 + (f", {c['not_evaluated']} not run (a column they need is missing)" if c["not_evaluated"] else "")]
        lines += [f"  - {o.message}" for o in self.failed]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "success": self.success, "n_rows": self.n_rows, "counts": self.counts,
                "failures": [o.message for o in self.failed], "parameters": self.parameters,
                "seconds": self.seconds, "great_expectations_version": self.ge_version,
                "expectations": [asdict(o) for o in self.outcomes]}


@dataclass
class _Check:
    """A suite entry: a GE expectation plus how to phrase its failure."""

    name: str
    description: str
    expectation_type: str  # the GE class name, e.g. "ExpectColumnValuesToBeBetween"
    kwargs: dict
    column: str | None
    needs: tuple[str, ...]  # frame columns that must exist for the check to run
    problem: str  # start of the failure sentence
    detail: Callable[[dict], str] | None = None  # how to show one offending row


def _value(column: str, fmt: str = "{}") -> Callable[[dict], str]:
    return lambda ex: fmt.format(_plain(ex.get(column)))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return None if value is pd.NA else value


def _build_checks(split_cols: list[str], scale: dict, min_width: int, min_height: int,
                  group_by: str) -> list[_Check]:
    required = BASE_COLUMNS + split_cols
    checks = [_Check("row_count", "the manifest has at least one row", "ExpectTableRowCountToBeBetween",
                     {"min_value": 1}, None, (), "the manifest has no rows")]
    checks += [_Check(f"column_exists:{c}", f"column '{c}' exists", "ExpectColumnToExist", {"column": c}, c, (),
                      f"required column '{c}' is missing from the manifest") for c in required]
    checks += [_Check(f"not_null:{c}", f"column '{c}' has no empty values", "ExpectColumnValuesToNotBeNull",
                      {"column": c}, c, (c,), f"column '{c}' has empty values") for c in required
               if c not in NULLABLE_COLUMNS]
    lo, hi = float(scale["lo"]), float(scale["hi"])
    checks += [_Check(f"type:{c}", f"column '{c}' holds float64 numbers", "ExpectColumnValuesToBeOfType",
                      {"column": c, "type_": "float64"}, c, (c,), f"column '{c}' is not a float64 column")
               for c in ("mos", "mos_raw")]
    checks += [
        _Check("unique:image_id", "column 'image_id' is unique", "ExpectColumnValuesToBeUnique",
               {"column": "image_id"}, "image_id", ("image_id",), "column 'image_id' has duplicated values",
               _value("path")),
        _Check("range:mos", "column 'mos' is in [0, 1]", "ExpectColumnValuesToBeBetween",
               {"column": "mos", "min_value": 0.0, "max_value": 1.0}, "mos", ("mos",),
               "column 'mos' has values outside [0, 1]", _value("mos", "mos={}")),
        _Check("range:mos_raw", f"column 'mos_raw' is within the declared scale [{lo:g}, {hi:g}]",
               "ExpectColumnValuesToBeBetween", {"column": "mos_raw", "min_value": lo, "max_value": hi},
               "mos_raw", ("mos_raw",), f"column 'mos_raw' has values outside the declared scale [{lo:g}, {hi:g}]",
               _value("mos_raw", "mos_raw={}")),
    ]
    for c in split_cols:
        checks.append(_Check(f"split_values:{c}", f"column '{c}' holds only {'/'.join(PARTS)}",
                             "ExpectColumnValuesToBeInSet", {"column": c, "value_set": list(PARTS)}, c, (c,),
                             f"column '{c}' has values other than {'/'.join(PARTS)}", _value(c, "{!r}")))
        checks.append(_Check(f"split_disjoint:{c}", f"split '{c}' keeps each {group_by} in one part",
                             "ExpectColumnValuesToBeInSet", {"column": f"_parts_{c}", "value_set": list(PARTS)},
                             c, (c, group_by), f"split '{c}' puts the same {group_by} in more than one part",
                             lambda ex, c=c: f"{group_by} {_plain(ex.get(group_by))!r} in {ex.get(f'_parts_{c}')}"))
    checks += [
        _Check("files_decode", "every image file exists and decodes", "ExpectColumnValuesToBeNull",
               {"column": "_file_problem"}, "path", ("path",), "image file missing or undecodable",
               _value("_file_problem")),
        _Check("min_width", f"every image is at least {min_width} px wide", "ExpectColumnValuesToBeBetween",
               {"column": "_width", "min_value": min_width}, "path", ("path",),
               f"image narrower than {min_width} px", _value("_width", "width {}")),
        _Check("min_height", f"every image is at least {min_height} px high", "ExpectColumnValuesToBeBetween",
               {"column": "_height", "min_value": min_height}, "path", ("path",),
               f"image lower than {min_height} px", _value("_height", "height {}")),
    ]
    return checks


def _decode_all(manifest: Manifest, paths: pd.Series, workers: int, progress: bool) -> pd.DataFrame:
    """Decode each image once: _file_problem (null when fine), _width and _height (null when not)."""
    todo = [(i, manifest.image_path(p)) for i, p in enumerate(paths) if not pd.isna(p)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(check_image, [p for _, p in todo]), total=len(todo), desc="decoding images",
                            unit="img", disable=not progress))
    problem: list[str | None] = [None] * len(paths)
    width: list[int | None] = [None] * len(paths)
    height: list[int | None] = [None] * len(paths)
    for (i, _), r in zip(todo, results):
        if isinstance(r, tuple):
            width[i], height[i] = r
        else:
            problem[i] = r
    return pd.DataFrame({"_file_problem": pd.Series(problem, dtype="string"),
                         "_width": pd.Series(width, dtype="Int64"), "_height": pd.Series(height, dtype="Int64")},
                        index=paths.index)


def _parts(frame: pd.DataFrame, column: str, group_by: str) -> pd.Series:
    """Per row: the valid parts ('train'/'val'/'test', joined by '+') that hold the row's group in a split."""
    valid = frame[column].where(frame[column].isin(PARTS))
    pairs = pd.DataFrame({"g": frame[group_by], "p": valid}).dropna().drop_duplicates().sort_values(["g", "p"])
    size = pairs.groupby("g")["p"].transform("size")
    single = pairs[size == 1].set_index("g")["p"]
    multi = pairs[size > 1].groupby("g")["p"].agg("+".join)
    return frame[group_by].map(pd.concat([single, multi])).astype("string")


def _frame_to_validate(manifest: Manifest, split_cols: list[str], group_by: str, workers: int,
                       progress: bool) -> pd.DataFrame:
    frame = manifest.frame.reset_index(drop=True).copy()
    if "path" in frame.columns:
        for name, column in _decode_all(manifest, frame["path"], workers, progress).items():
            frame[name] = column
    if group_by in frame.columns:
        for c in split_cols:
            if c in frame.columns:
                frame[f"_parts_{c}"] = _parts(frame, c, group_by)
    return frame


def _example(raw: dict) -> dict:
    return {k: _plain(v) for k, v in raw.items()}


def _sentence(check: _Check, result: dict, examples: list[dict], exception: str | None) -> str:
    if exception:
        return f"{check.problem}: the check could not run ({exception})"
    n = result.get("unexpected_count")
    if not examples or n is None:
        observed = result.get("observed_value")
        return check.problem + (f" (observed {observed})" if observed is not None else "")
    shown = []
    for ex in examples[:MAX_EXAMPLES]:
        label = ex.get("path") if check.column == "path" else ex.get("image_id")
        label = label if label is not None else ex.get("path", "a row without image_id")
        shown.append(f"{label} ({check.detail(ex)})" if check.detail else str(label))
    more = f" … and {n - len(shown)} more" if n > len(shown) else ""
    return f"{check.problem}: {', '.join(shown)}{more} ({n} of {result.get('element_count')} rows)"


def _exception_message(info: dict) -> str | None:
    """GE's exception_info is either one record or a dict of records keyed by metric."""
    records = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = [r.get("exception_message") or "unknown error" for r in records if r.get("raised_exception")]
    return "; ".join(dict.fromkeys(messages)) or None


def _outcome(check: _Check, ge_result: dict | None) -> ExpectationOutcome:
    out = ExpectationOutcome(check.name, check.description, check.expectation_type, check.column, check.kwargs)
    if ge_result is None:
        missing = ", ".join(repr(c) for c in check.needs)
        out.evaluated, out.message = False, f"not run: it needs column(s) {missing}, which the manifest lacks"
        return out
    result = ge_result.get("result") or {}
    exception = _exception_message(ge_result.get("exception_info") or {})
    out.success = bool(ge_result["success"])
    out.element_count = result.get("element_count")
    out.unexpected_count = result.get("unexpected_count")
    out.observed_value = _plain(result.get("observed_value"))
    out.examples = [_example(e) for e in result.get("partial_unexpected_index_list") or []]
    if not out.success:
        out.message = _sentence(check, result, out.examples, exception)
    return out


def _run_suite(frame: pd.DataFrame, checks: list[_Check], group_by: str) -> tuple[dict[str, dict], str]:
    """Validate the frame with one GE suite; returns each check's result (by name) and GE's version."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (context.data_sources.add_pandas("manifest").add_dataframe_asset("frame")
                        .add_batch_definition_whole_dataframe("whole manifest"))
    suite = gx.ExpectationSuite(name="qfm-manifest")
    for check in checks:
        cls = getattr(gx.expectations, check.expectation_type)
        suite.add_expectation(cls(**check.kwargs, description=check.description, meta={"qfm_check": check.name}))
    suite = context.suites.add(suite)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    index_columns = [c for c in dict.fromkeys((*INDEX_COLUMNS, group_by)) if c in frame.columns]
    result = batch.validate(suite, result_format={
        "result_format": "SUMMARY", "unexpected_index_column_names": index_columns,
        "partial_unexpected_count": REPORT_EXAMPLES, "return_unexpected_index_query": False})
    by_name = {}
    for r in result.to_json_dict()["results"]:
        by_name[r["expectation_config"]["meta"]["qfm_check"]] = r
    return by_name, gx.__version__


def validate_manifest(manifest: Manifest, min_width: int = 224, min_height: int = 224,
                      report_dir: Path | None = None, progress: bool = True, workers: int = 4) -> ValidationResult:
    """Run the manifest's great-expectations suite; write validation.json/.html into report_dir if given."""
    meta = manifest.meta or {}
    scale = meta.get("scale") or {}
    if "lo" not in scale or "hi" not in scale:
        raise DataError(f"manifest of '{meta.get('dataset', '?')}' records no score scale (meta['scale'] lo/hi): "
                        "re-run `qfm ingest` to rebuild it")
    splits = meta.get("splits") or {}
    if "columns" not in splits:
        raise DataError(f"manifest of '{meta.get('dataset', '?')}' records no split columns "
                        "(meta['splits']['columns']): re-run `qfm ingest` to rebuild it")
    split_cols = list(splits["columns"]) + [c for c in manifest.split_columns if c not in splits["columns"]]
    group_by = splits.get("group_by", "content_id")
    t0 = time.perf_counter()
    frame = _frame_to_validate(manifest, split_cols, group_by, workers, progress)
    t1 = time.perf_counter()
    checks = _build_checks(split_cols, scale, min_width, min_height, group_by)
    runnable = [c for c in checks if all(n in frame.columns for n in c.needs)]
    ge_results, ge_version = _run_suite(frame, runnable, group_by)
    t2 = time.perf_counter()
    outcomes = [_outcome(c, ge_results.get(c.name)) for c in checks]
    result = ValidationResult(
        success=all(o.success for o in outcomes if o.evaluated), dataset=str(meta.get("dataset", "?")),
        n_rows=len(frame), outcomes=outcomes, ge_version=ge_version,
        parameters={"min_width": min_width, "min_height": min_height, "scale": scale, "split_columns": split_cols,
                    "group_by": group_by},
        seconds={"decode": round(t1 - t0, 3), "validate": round(t2 - t1, 3)})
    if report_dir is not None:
        write_report(result, report_dir)
    return result


def write_report(result: ValidationResult, report_dir: str | Path) -> tuple[Path, Path]:
    """Write validation.json (every check, observed values, offending rows) and validation.html."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = report_dir / REPORT_JSON, report_dir / REPORT_HTML
    json_path.write_text(json.dumps(result.to_dict(), indent=2, default=_plain) + "\n")
    html_path.write_text(_html(result))
    return json_path, html_path


def _html(result: ValidationResult) -> str:
    rows = []
    for o in result.outcomes:
        status = "not run" if not o.evaluated else "pass" if o.success else "FAIL"
        detail = o.message if (o.message or not o.evaluated) else (
            f"{o.unexpected_count} of {o.element_count} rows unexpected" if o.unexpected_count is not None
            else f"observed {o.observed_value}" if o.observed_value is not None else "")
        rows.append(f'<tr class="{status.replace(" ", "-").lower()}"><td>{html.escape(o.name)}</td>'
                    f"<td>{html.escape(o.description)}</td><td>{status}</td><td>{html.escape(str(detail))}</td></tr>")
    c = result.counts
    title = f"Validation of {result.dataset}: {'passed' if result.success else 'FAILED'}"
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
            ".fail{background:#fdd}.pass{background:#efe}.not-run{background:#eee}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{result.n_rows} rows; {c['passed']} of {c['evaluated']} checks "
            f"passed, {c['failed']} failed, {c['not_evaluated']} not run. great_expectations "
            f"{html.escape(result.ge_version)}.</p>\n<table><tr><th>check</th><th>expectation</th>"
            "<th>result</th><th>details</th></tr>\n" + "\n".join(rows) + "\n</table></body></html>\n")


def raise_if_failed(result: ValidationResult, report_dir: str | Path | None = None) -> None:
    """Raise DataError listing each failed check in plain words (and where the report is); else return."""
    if result.success:
        return
    where = f"\nFull report: {Path(report_dir) / REPORT_HTML}" if report_dir is not None else ""
    raise DataError(result.summary() + where
                    + "\nFix the dataset (or the adapter) and re-run `qfm ingest`, then `qfm validate`.")
