"""Ablation of QFM-IQM's training-time parts on several splits: the same recipe and epochs in every row.

Rows (each split shares one teacher, one DLE pool and the banks):
  baseline      the plain DEIQT fine-tune (the teacher itself)
  dle           + DLE pseudo-labels, no QCC
  qcc_aliasing  + SNM/QCC, aliasing partners, labelled images only
  qcc_semantic  + SNM/QCC, semantic partners, labelled images only
  full          DLE + SNM/QCC (aliasing), the train_student parameters given
  full_<name>   the full model with other QCC settings (--candidate), for choosing the default

The default is chosen by the median validation SRCC over splits (each row's epoch is chosen on its
split's val part too); test figures are reported for every row, whichever wins.

    python benchmarks/ablation.py --manifest M --params benchmarks/clive_params.yaml \
        --splits split_0,split_1,split_2 --work W --report R [--jobs 3] [--set run.device=cuda]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from qfm.config import load_params
from qfm.steps.bank import build_bank
from qfm.steps.evaluate import evaluate
from qfm.steps.pseudo_label import pseudo_label
from qfm.steps.student import train_student
from qfm.steps.teacher import train_teacher

METRICS = ("srcc", "plcc_raw", "plcc_logistic", "krcc")
BANKS = {"aliasing_labelled": ("aliasing", False), "semantic_labelled": ("semantic", False),
         "aliasing_all": ("aliasing", True)}
ROWS = {"dle": ({"qcc": False, "use_pseudo_labels": True}, None),
        "qcc_aliasing": ({"qcc": True, "use_pseudo_labels": False}, "aliasing_labelled"),
        "qcc_semantic": ({"qcc": True, "use_pseudo_labels": False}, "semantic_labelled"),
        "full": ({"qcc": True, "use_pseudo_labels": True}, "aliasing_all")}


def parse_candidate(text: str) -> tuple[str, dict]:
    """'a05_l1:alpha=0.5,lambda_qcc=1.0' -> ('full_a05_l1', {'alpha': 0.5, 'lambda_qcc': 1.0})."""
    name, _, body = text.partition(":")
    return f"full_{name}", {k: float(v) for k, v in (item.split("=") for item in body.split(","))}


def run_split(manifest: str, work: str, report: str, params_file: str, overrides: list[str], split: str,
              candidates: list[str]) -> dict:
    """Every row on one split; writes REPORT/<split>.json after each row (so a cut-off run keeps its rows)."""
    params = load_params(params_file, overrides)
    run = replace(params["run"], split=split)
    d = Path(work) / split
    rows: dict[str, dict] = {}

    def record(name: str, train_dir: Path, started: float) -> None:
        summary = json.loads((train_dir / "summary.json").read_text())
        test = evaluate(manifest, train_dir, d / f"eval_{name}", run, progress=False)
        rows[name] = {"val": summary["val"], "test": test, "best_epoch": summary["best_epoch"],
                      "seconds": round(time.perf_counter() - started, 1)}
        Path(report, f"{split}.json").write_text(json.dumps(rows, indent=2) + "\n")

    started = time.perf_counter()
    train_teacher(manifest, d / "teacher", params["train_teacher"], run, resume=True, progress=False)
    record("baseline", d / "teacher", started)
    pseudo_label(manifest, d / "teacher", d / "pseudo", params["pseudo_label"], run, progress=False)
    for bank, (rule, with_pseudo) in BANKS.items():
        bank_params = replace(params["build_bank"], rule=rule, include_pseudo=with_pseudo)
        build_bank(manifest, d / "teacher", d / "pseudo", d / f"bank_{bank}", bank_params, run, progress=False)
    plan = [("full", ROWS["full"], {})] + [(n, ROWS[n], {}) for n in ("dle", "qcc_aliasing", "qcc_semantic")]
    plan += [(name, ROWS["full"], extra) for name, extra in map(parse_candidate, candidates)]
    for name, (fields, bank), extra in plan:
        started = time.perf_counter()
        try:
            student = replace(params["train_student"], **fields, **extra)
            train_student(manifest, d / name, student, run, teacher_dir=d / "teacher", pseudo_dir=d / "pseudo",
                          bank_dir=d / f"bank_{bank}" if bank else None, resume=True, progress=False)
            record(name, d / name, started)
        except Exception:  # noqa: BLE001 -- one row failing must not lose the others; the error is reported
            rows[name] = {"error": traceback.format_exc(limit=3)}
            Path(report, f"{split}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def table(per_split: dict[str, dict]) -> tuple[list[dict], str]:
    """Medians over splits per row, and a Markdown table; the chosen full setting is the best median val SRCC."""
    names = list(dict.fromkeys(n for rows in per_split.values() for n in rows))
    out = []
    for name in names:
        done = [rows[name] for rows in per_split.values() if "test" in rows.get(name, {})]
        if not done:
            continue
        entry = {"row": name, "n_splits": len(done), "val_srcc": float(np.median([r["val"]["srcc"] for r in done]))}
        entry |= {f"test_{m}": float(np.median([r["test"][m] for r in done])) for m in METRICS}
        entry["test_srcc_mean"] = float(np.mean([r["test"]["srcc"] for r in done]))
        entry["test_srcc_std"] = float(np.std([r["test"]["srcc"] for r in done], ddof=1)) if len(done) > 1 else None
        entry["seconds"] = float(np.median([r["seconds"] for r in done]))
        out.append(entry)
    full = [e for e in out if e["row"].startswith("full")]
    chosen = max(full, key=lambda e: e["val_srcc"])["row"] if full else None
    header = ("| row | splits | val SRCC | test SRCC | test PLCC raw | test PLCC logistic | test KRCC | "
              "test SRCC mean ± std | s / row |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for e in out:
        std = f" ± {e['test_srcc_std']:.3f}" if e["test_srcc_std"] is not None else ""
        mark = " (chosen on val)" if e["row"] == chosen else ""
        lines.append(f"| {e['row']}{mark} | {e['n_splits']} | {e['val_srcc']:.3f} | {e['test_srcc']:.3f} | "
                     f"{e['test_plcc_raw']:.3f} | {e['test_plcc_logistic']:.3f} | {e['test_krcc']:.3f} | "
                     f"{e['test_srcc_mean']:.3f}{std} | {e['seconds']:.0f} |")
    lines.append("\nMedians over splits; val = the best epoch's validation SRCC (the epoch chosen on val); "
                 "PLCC raw and after the 4-parameter logistic fit.")
    return out, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--params", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--splits", default="split_0,split_1,split_2")
    parser.add_argument("--candidate", action="append", default=[],
                        help="another full setting, NAME:key=value,... (e.g. a05_l1:alpha=0.5,lambda_qcc=1.0)")
    parser.add_argument("--work", required=True, help="folder for the trained models")
    parser.add_argument("--report", required=True, help="folder for the per-split JSON and the table")
    parser.add_argument("--jobs", type=int, default=1, help="splits run side by side")
    args = parser.parse_args()
    Path(args.report).mkdir(parents=True, exist_ok=True)
    splits = args.splits.split(",")
    job = (args.manifest, args.work, args.report, args.params, args.set)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {s: pool.submit(run_split, *job, s, args.candidate) for s in splits}
        per_split = {s: f.result() for s, f in futures.items()}
    rows, markdown = table(per_split)
    Path(args.report, "ablation.json").write_text(json.dumps({"rows": rows, "per_split": per_split}, indent=2))
    Path(args.report, "ablation.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
