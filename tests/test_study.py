"""`qfm study` on the tiny demo: the paired table, intervals and plot; a rerun reuses every unit; a changed
parameter recomputes exactly the units it touches; a resume with other parameters is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_TRAINING

from qfm.cli import main
from qfm.config import RunParams, TrainParams
from qfm.errors import ConfigError
from qfm.eval.paired import image_bootstrap, paired_differences
from qfm.steps.study import read_rows, row_keys, row_params, run_study
from qfm.steps.teacher import train_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"epochs": 1, "batch_size": 4, "n_crops": 1, "crop_size": 96, "test_grid": "1x2", "workers": 0,
        "warmup_epochs": 0.5, "lr": 5e-4}
SETTINGS = [f"{section}.{k}={v}" for section in ("train_teacher", "train_student") for k, v in TINY.items()] + [
    "run.device=cpu", "pseudo_label.workers=0", "build_bank.workers=0", "build_bank.tau=0.05"]
ROWS = {"reference": "baseline",
        "rows": {"baseline": {"train_student.qcc": False, "train_student.use_pseudo_labels": False},
                 "qcc": {"train_student.use_pseudo_labels": False, "build_bank.include_pseudo": False,
                         "train_student.alpha": 0.5}}}
UNIT_LINE = re.compile(r"^\s*(split_\d)\s+(\S+)\s+(\w+)-([0-9a-f]{8})\s+.*?(reused|\d+ s)$")


def _units(text: str) -> list[tuple[str, str, str, str]]:
    """(split, row, kind, 'reused' or 'ran') for every progress line."""
    found = [UNIT_LINE.match(line) for line in text.splitlines()]
    return [(m[1], m[2], m[3], "reused" if m[5] == "reused" else "ran") for m in found if m]


@pytest.fixture(scope="module")
def first_study(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    rows = out / "rows.yaml"
    rows.write_text(yaml.safe_dump(ROWS, sort_keys=False))
    study = run_study(tiny_demo, out / "run", ["split_0", "split_1"], rows_file=rows, overrides=SETTINGS,
                      progress=False)
    return out, rows, study


def test_study_writes_the_paired_table_intervals_and_plot(first_study):
    out, _, _ = first_study
    run = out / "run"
    for name in ("study.json", "study.md", "study_differences.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 200, name
    saved = json.loads((run / "study.json").read_text())
    assert saved["reference"] == "baseline" and saved["splits"] == ["split_0", "split_1"]
    assert set(saved["source"]) == {"commit", "dirty"}  # the git state of the code (None outside a checkout)
    assert set(saved["context"]["code"]) == {"train", "pseudo", "bank", "student", "evaluate"}
    assert saved["context"]["device"]["type"] == "cpu" and "cpu_capability" in saved["context"]["device"]
    rows = {r["row"]: r for r in saved["rows"]}
    assert set(rows) == {"baseline", "qcc"} and not rows["qcc"]["errors"]
    vs = rows["qcc"]["vs_reference"]["test_srcc"]
    per_split = [rows["qcc"]["test_srcc"]["per_split"][s] - rows["baseline"]["test_srcc"]["per_split"][s]
                 for s in ("split_0", "split_1")]
    assert vs["n"] == 2 and np.allclose(vs["differences"], per_split)
    assert vs["ci_t"][0] <= vs["mean"] <= vs["ci_t"][1] and len(vs["ci_bootstrap"]) == 2
    sizes = saved["part_sizes"]["split_0"]  # the images the models were fitted on / tested on, from the units
    assert sizes["train"] > 0 and sizes["test"] == saved["per_split"]["split_0"]["baseline"]["test"]["n"]
    ratio = np.mean([saved["part_sizes"][s]["test"] / saved["part_sizes"][s]["train"] for s in ("split_0", "split_1")])
    half = 12.706204736174705 * np.sqrt((1 / 2 + ratio) * np.var(per_split, ddof=1))  # t(0.975, 1)
    assert vs["ci_corrected"] == pytest.approx([np.mean(per_split) - half, np.mean(per_split) + half])
    assert rows["qcc"]["vs_reference"]["image_bootstrap"]["srcc"]["n_images"] > 0
    assert saved["best_row_by_val"] == max(rows, key=lambda r: rows[r]["val_srcc"]["median"])
    markdown = (run / "study.md").read_text()
    for text in ("| qcc | test SRCC | 2 |", "95% CI corrected resampled t (headline)", "95% CI plain t",
                 "Wilcoxon p (exact)", "test PLCC fitted", "PLCC raw",
                 "chosen on validation only"):
        assert text in markdown, text


def test_baseline_row_is_the_teacher_unit_when_the_recipes_agree(first_study, tiny_demo):
    out, _, study = first_study
    params = {r.name: row_params(None, SETTINGS, r) for r in read_rows(out / "rows.yaml")[0]}
    for split, rows in study["per_split"].items():
        for name, chain in rows.items():  # the keys computed without running are the keys the units got
            planned = row_keys(tiny_demo, params[name], study["context"])
            assert chain["units"] == {role: key for role, key in planned.items() if role != "test"}, (split, name)
            record = json.loads((out / "run" / "units" / split / f"train-{chain['units']['teacher']}" / "unit.json")
                                .read_text())
            assert record["context"]["code"] == study["context"]["code"]["train"]  # its own kind's code only
        assert rows["baseline"]["units"]["model"] == rows["baseline"]["units"]["teacher"], split
        assert rows["qcc"]["units"]["teacher"] == rows["baseline"]["units"]["teacher"], split
        assert "bank" in rows["qcc"]["units"] and "pseudo" not in rows["qcc"]["units"]


def test_rerun_reuses_every_unit_and_a_changed_parameter_recomputes_only_what_it_touches(
        first_study, tiny_demo, capsys):
    out, rows, _ = first_study
    capsys.readouterr()
    run_study(tiny_demo, out / "run", ["split_0", "split_1"], rows_file=rows, overrides=SETTINGS)
    again = _units(capsys.readouterr().out)
    assert len(again) == 2 * (3 + 4) and all(state == "reused" for *_, state in again)

    changed = out / "changed.yaml"
    data = json.loads(json.dumps(ROWS))
    data["rows"]["qcc"]["train_student.alpha"] = 0.25
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    run_study(tiny_demo, out / "run", ["split_0", "split_1"], rows_file=changed, overrides=SETTINGS)
    units = _units(capsys.readouterr().out)
    ran = {(row, kind) for _, row, kind, state in units if state == "ran"}
    assert ran == {("qcc", "student"), ("qcc", "evaluate")}
    assert sum(state == "ran" for *_, state in units) == 4  # two units on each of the two splits


def test_study_command_and_rows_errors(tiny_demo, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rows": {"a": {"train_student.alhpa": 1}}}))
    code = main(["study", "--manifest", str(tiny_demo), "--rows", str(bad), "--out", str(tmp_path / "o"),
                 "--splits", "split_0"])
    assert code == 2 and "row 'a'" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"rows": {"a": {"run.split": "split_1"}}}))
    with pytest.raises(ConfigError, match="run.split"):
        read_rows(bad)
    bad.write_text(yaml.safe_dump({"rows": {"a": {}}, "reference": "b"}))
    with pytest.raises(ConfigError, match="reference 'b'"):
        read_rows(bad)
    rows, reference = read_rows(None)
    assert [r.name for r in rows] == ["baseline", "qfm"] and reference == "baseline"


def test_resume_with_other_parameters_is_refused_naming_them(tiny_demo, tiny_teacher, tmp_path):
    run = RunParams(split="split_0", device="cpu")
    assert TINY == TINY_TRAINING  # the shared teacher is this recipe on split_0: copy it instead of training
    shutil.copytree(tiny_teacher[0], tmp_path, dirs_exist_ok=True)
    with pytest.raises(ConfigError, match=r"n_crops: 1 in the checkpoint, 2 now; lr: 0.0005 in the checkpoint, 0.001 now"):
        train_teacher(tiny_demo, tmp_path, TrainParams(**(TINY | {"lr": 1e-3, "n_crops": 2})), run, resume=True,
                      progress=False)
    with pytest.raises(ConfigError, match="the training images, scores or crop settings differ"):
        train_teacher(tiny_demo, tmp_path, TrainParams(**TINY), RunParams(split="split_1", device="cpu"),
                      resume=True, progress=False)
    # the execution-only setting may differ, and an equal run resumes (here: nothing left to do)
    summary = train_teacher(tiny_demo, tmp_path, TrainParams(**(TINY | {"workers": "auto"})), run, resume=True,
                            progress=False)
    assert summary["best_epoch"] == 0


def test_paired_statistics_by_hand():
    a, b = [0.80, 0.75, 0.90, 0.70], [0.78, 0.76, 0.85, 0.66]
    d = np.subtract(a, b)
    out = paired_differences(a, b)
    assert out["mean"] == pytest.approx(d.mean()) and out["median"] == pytest.approx(np.median(d))
    assert (out["wins"], out["losses"], out["ties"]) == (3, 1, 0)
    half = 3.182446305284263 * d.std(ddof=1) / 2  # t(0.975, 3) * sd / sqrt(4)
    assert out["ci_t"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert min(d) <= out["ci_bootstrap"][0] <= out["ci_bootstrap"][1] <= max(d)
    assert out["wilcoxon_p"] == pytest.approx(0.25)  # exact: signed ranks 1 vs 9 of n=4 -> 2 * 2/16
    same = paired_differences(a, a)
    assert same["wilcoxon_p"] is None and same["mean"] == 0


def test_image_bootstrap_prefers_the_better_predictor():
    rng = np.random.default_rng(0)
    splits = []
    for _ in range(3):
        mos = rng.random(80)
        splits.append((mos, mos + rng.normal(0, 0.05, 80), mos + rng.normal(0, 0.4, 80)))
    out = image_bootstrap(splits, "srcc", n_boot=500)
    assert out["mean"] > 0 and out["ci"][0] > 0 and out["share_better"] > 0.99 and out["n_images"] == 240
    reverse = image_bootstrap([(m, b, a) for m, a, b in splits], "srcc", n_boot=500)
    assert reverse["mean"] == pytest.approx(-out["mean"]) and reverse["ci"][1] < 0


@pytest.mark.parametrize("rows_file", sorted((Path(__file__).resolve().parents[1] / "benchmarks/studies")
                                             .glob("*.yaml")), ids=lambda p: p.name)
def test_committed_rows_state_every_student_switch(rows_file):
    """A committed study must rerun as it ran: each row sets QCC and DLE itself, so that a change of
    params.yaml's defaults cannot turn a QCC row into a plain one; and every row's parameters validate."""
    from qfm.steps.study import read_rows, row_params

    rows, _ = read_rows(rows_file)
    for row in rows:
        keys = {o.split("=", 1)[0] for o in row.overrides}
        assert {"train_student.qcc", "train_student.use_pseudo_labels"} <= keys, (rows_file.name, row.name)
        params = row_params(rows_file.parents[1] / "clive_params.yaml", [], row)
        assert params["train_student"].qcc == row.name.startswith(("qcc", "full")), row.name
