"""protocol: teacher -> DLE -> SNM -> student -> evaluate on each of several splits, then median and
mean +- std over splits (test figures; every choice inside a split is made on its validation part)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from qfm.eval.metrics import aggregate
from qfm.steps.bank import build_bank
from qfm.steps.common import write_json
from qfm.steps.evaluate import evaluate
from qfm.steps.pseudo_label import pseudo_label
from qfm.steps.student import train_student
from qfm.steps.teacher import train_teacher


def run_split(manifest_dir: str | Path, out_dir: Path, params: dict, split: str, *, progress: bool = True) -> dict:
    """The whole training chain on one split; returns the student's and the teacher's test metrics."""
    run = replace(params["run"], split=split)
    started = time.perf_counter()
    d = out_dir / split
    train_teacher(manifest_dir, d / "teacher", params["train_teacher"], run, resume=True, progress=progress)
    teacher_test = evaluate(manifest_dir, d / "teacher", d / "eval_teacher", run, progress=progress)
    use_pool = bool(params["pseudo_label"].pool) and params["train_student"].use_pseudo_labels
    if use_pool:
        pseudo_label(manifest_dir, d / "teacher", d / "pseudo", params["pseudo_label"], run, progress=progress)
    student = params["train_student"]
    if student.qcc:
        build_bank(manifest_dir, d / "teacher", d / "pseudo" if use_pool else None, d / "bank", params["build_bank"],
                   run, progress=progress)
    train_student(manifest_dir, d / "student", student, run, teacher_dir=d / "teacher",
                  pseudo_dir=d / "pseudo" if use_pool else None, bank_dir=d / "bank" if student.qcc else None,
                  resume=True, progress=progress)
    student_test = evaluate(manifest_dir, d / "student", d / "eval_student", run, progress=progress)
    return {"split": split, "student": student_test, "teacher": teacher_test,
            "seconds": round(time.perf_counter() - started, 1)}


def run_protocol(manifest_dir: str | Path, out_dir: str | Path, params: dict, splits: list[str], *,
                 progress: bool = True) -> dict:
    """Every split in turn (resumable: finished steps are skipped on a rerun); writes protocol.json."""
    out_dir = Path(out_dir)
    results = [run_split(manifest_dir, out_dir, params, s, progress=progress) for s in splits]
    summary = {"splits": splits, "per_split": results,
               "student": aggregate([r["student"] for r in results]),
               "teacher": aggregate([r["teacher"] for r in results]),
               "note": "test-part figures; epochs chosen on each split's validation part; PLCC raw and "
                       "4-parameter-logistic fitted; aggregate = median and mean +- sample std over splits"}
    write_json(out_dir / "protocol.json", summary)
    return summary
