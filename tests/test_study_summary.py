"""A study's summary without training: the headline interval from the splits' part sizes, ranking on the
splits every row finished, study.md's named intervals, `qfm study-summary` on a finished study.json, and the
KFP study report's metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics
from test_kfp_components import out

import components as qc
from qfm.cli import main
from qfm.errors import ConfigError
from qfm.eval.paired import corrected_t_interval
from qfm.steps.study import Row, resummarize, summarize, write_study

SPLITS = ["split_0", "split_1", "split_2", "split_3"]
ROWS = [Row("baseline", ('train_student.qcc=false',)), Row("qcc", ('train_student.qcc=true',))]
# qcc fails on split_2 and split_3, where the baseline's validation SRCC is high: over its own splits the
# baseline's median (0.83) beats qcc's (0.745); over the splits both finished it does not (0.705).
VAL = {"baseline": [0.70, 0.71, 0.95, 0.96], "qcc": [0.74, 0.75]}
TEST = {"baseline": [0.78, 0.80, 0.77, 0.79], "qcc": [0.79, 0.78]}


def _result(folder: Path, split: str, row: str, i: int, n_train: int | None = 280) -> dict:
    rng = np.random.default_rng(10 * i + len(row))
    mos = np.random.default_rng(i).random(80)
    path = folder / f"{split}_{row}.csv"
    pd.DataFrame({"image_id": [f"im{k}" for k in range(80)], "mos": mos,
                  "prediction": mos + rng.normal(0, 0.2, 80)}).to_csv(path, index=False)
    result = {"units": {}, "best_epoch": 1, "val": {"srcc": VAL[row][i], "plcc_raw": VAL[row][i], "n": 40},
              "test": {"srcc": TEST[row][i], "plcc_raw": TEST[row][i] + 0.02, "plcc_logistic": TEST[row][i] + 0.03,
                       "n": 80}, "predictions": str(path)}
    return result | ({"n_train": n_train} if n_train else {})


def _per_split(folder: Path, n_train: int | None = 280) -> dict:
    per_split = {}
    for i, split in enumerate(SPLITS):
        per_split[split] = {"baseline": _result(folder, split, "baseline", i, n_train)}
        per_split[split]["qcc"] = (_result(folder, split, "qcc", i, n_train) if i < 2
                                   else {"error": "QCC broke on this split"})
    return per_split


def test_summary_headline_from_the_part_sizes_and_ranking_on_common_splits(tmp_path):
    study = summarize(ROWS, "baseline", _per_split(tmp_path), None)
    assert study["part_sizes"]["split_3"] == {"train": 280, "val": 40, "test": 80}
    assert study["ranked_on_splits"] == ["split_0", "split_1"] and study["best_row_by_val"] == "qcc"
    vs = {e["row"]: e for e in study["rows"]}["qcc"]["vs_reference"]
    assert vs["splits"] == ["split_0", "split_1"] and vs["test_train_ratio"] == pytest.approx(80 / 280)
    d = vs["test_srcc"]["differences"]
    assert d == pytest.approx([0.01, -0.02])
    assert vs["test_srcc"]["ci_corrected"] == pytest.approx(corrected_t_interval(d, 80 / 280))
    assert vs["image_bootstrap"]["srcc"]["n_degenerate"] == 0
    study |= {"splits": SPLITS}
    write_study(tmp_path / "out", study)
    markdown = (tmp_path / "out" / "study.md").read_text()
    for text in ("Headline interval: **corrected resampled t, 95%**", "95% CI corrected resampled t (headline)",
                 "95% CI plain t", "bootstrap over splits (descriptive)", "Wilcoxon p (exact) | zeros",
                 "Parts per split: 280 train / 40 val / 80 test images; n_test/n_train = 80/280 = 0.286",
                 "finished (split_0, split_1): `qcc`"):
        assert text in markdown, text
    low, high = vs["test_srcc"]["ci_corrected"]
    assert f"| qcc | test SRCC | 2 | -0.005 | -0.005 | [{low:+.3f}, {high:+.3f}] |" in markdown


def test_study_summary_recomputes_an_older_study_json_keeping_its_stored_image_bootstrap(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    old = summarize(ROWS, "baseline", _per_split(runs, n_train=None), None)
    stored = {e["row"]: e.get("vs_reference", {}).get("image_bootstrap") for e in old["rows"]}
    for entry in old["rows"]:  # as an older study.json: no corrected interval recorded
        for value in entry.get("vs_reference", {}).values():
            if isinstance(value, dict):
                value.pop("ci_corrected", None)
    old |= {"splits": SPLITS, "context": {"code": "c0de"}, "wall_seconds": 12.0}
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    (study_dir / "study.json").write_text(json.dumps(old))
    shutil.rmtree(runs)  # the predictions are gone, as for the committed studies

    assert main(["study-summary", str(study_dir), "--train-images", "280"]) == 0
    printed = capsys.readouterr().out
    again = json.loads((study_dir / "study.json").read_text())
    vs = {e["row"]: e for e in again["rows"]}["qcc"]["vs_reference"]
    assert vs["test_srcc"]["ci_corrected"] == pytest.approx(corrected_t_interval([0.01, -0.02], 80 / 280))
    assert vs["image_bootstrap"] == stored["qcc"] and again["resummarized"]["image_bootstrap"].startswith("stored")
    assert again["context"] == {"code": "c0de"} and again["wall_seconds"] == 12.0
    assert again["per_split"] == old["per_split"] and again["part_sizes"]["split_0"]["train"] == 280
    assert "corrected resampled t, 95% [" in printed
    assert "`qfm study-summary OUT --train-images 280`" in (study_dir / "study.md").read_text()
    first = (study_dir / "study.json").read_text()
    resummarize(study_dir)  # again without the flag: the sizes of the first re-summary are kept
    assert json.loads((study_dir / "study.json").read_text())["rows"] == json.loads(first)["rows"]
    data = json.loads((study_dir / "study.json").read_text())
    data["per_split"]["split_0"]["qcc"]["n_train"] = 280
    (study_dir / "study.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="row 'qcc' on split_0 records n_train 280, not --train-images 300"):
        resummarize(study_dir, train_images=300)
    with pytest.raises(ConfigError, match="does not exist"):
        resummarize(tmp_path / "nowhere")


def test_study_summary_compares_with_another_reference_row(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    original = summarize(ROWS, "baseline", _per_split(runs), None) | {"splits": SPLITS}
    (study_dir / "study.json").write_text(json.dumps(original))

    assert main(["study-summary", str(study_dir), "--reference", "qcc"]) == 0
    again = json.loads((study_dir / "study.json").read_text())
    assert again["reference"] == "qcc" and again["resummarized"]["reference"] == "qcc"
    rows = {e["row"]: e for e in again["rows"]}
    assert "vs_reference" not in rows["qcc"]
    vs = rows["baseline"]["vs_reference"]  # baseline minus qcc, on the splits both finished
    assert vs["splits"] == ["split_0", "split_1"] and vs["test_srcc"]["differences"] == pytest.approx([-0.01, 0.02])
    assert vs["image_bootstrap"]["srcc"]["n_images"] > 0  # recomputed: the predictions are there
    assert "`qfm study-summary OUT --reference qcc`" in (study_dir / "study.md").read_text()

    shutil.rmtree(runs)  # without the predictions, a stored bootstrap (against the other row) is not kept
    (study_dir / "study.json").write_text(json.dumps(original))
    again = resummarize(study_dir, reference="qcc")
    assert "image_bootstrap" not in {e["row"]: e for e in again["rows"]}["baseline"]["vs_reference"]
    assert again["resummarized"]["image_bootstrap"].startswith("left out")
    capsys.readouterr()
    assert main(["study-summary", str(study_dir), "--reference", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--reference 'nope' is not a row of" in err and "its rows: baseline, qcc" in err


def test_the_study_report_component_logs_the_headline_interval(tmp_path):
    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / "rows.yaml").write_text(yaml.safe_dump({"rows": {"baseline": {"train_student.qcc": False},
                                                             "qcc": {"train_student.qcc": True}},
                                                    "reference": "baseline"}))
    (plan / "params.yaml").write_text("{}\n")
    (plan / "plan.json").write_text(json.dumps({"splits": SPLITS[:2], "rows": ["baseline", "qcc"],
                                                "context": {"data": "d", "code": "c", "device": "cpu"}}))
    gathered = []
    for i, split in enumerate(SPLITS[:2]):
        folder = tmp_path / split
        folder.mkdir()
        rows = {row: _result(folder, split, row, i) for row in ("baseline", "qcc")}
        for result in rows.values():
            result["predictions"] = Path(result["predictions"]).name
        (folder / "split.json").write_text(json.dumps({"split": split, "rows": rows}))
        gathered.append(Dataset(name=split, uri=str(folder)))
    metrics = out(Metrics, tmp_path / "metrics")
    failed = qc.study_report.python_func(plan=Artifact(name="plan", uri=str(plan)), splits=gathered,
                                         study=out(Dataset, tmp_path / "study"),
                                         report=out(Markdown, tmp_path / "report.md"),
                                         plot=out(HTML, tmp_path / "plot.html"), metrics=metrics)
    assert failed == 0
    saved = json.loads((tmp_path / "study" / "study.json").read_text())
    vs = {e["row"]: e for e in saved["rows"]}["qcc"]["vs_reference"]["test_srcc"]
    logged = metrics.metadata
    assert [logged["qcc_test_srcc_diff_ci_corrected_low"], logged["qcc_test_srcc_diff_ci_corrected_high"]] == \
        pytest.approx(corrected_t_interval(vs["differences"], 80 / 280))
    assert "qcc_test_srcc_diff_ci_low" not in logged
    assert "corrected resampled t, 95%" in (tmp_path / "report.md").read_text()
