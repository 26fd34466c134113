"""The `qfm` command end to end through a real subprocess: exit codes and messages a user sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from qfm.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def qfm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The qfm command in a subprocess, on one torch thread (two spinning OpenMP threads crawl on a busy
    2-core machine; no result here depends on the thread count)."""
    return subprocess.run([sys.executable, "-m", "qfm.cli", *args], capture_output=True, text=True, cwd=cwd, check=False,
                          timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})


def write_csv_dataset(root: Path, n: int = 10, size: int = 240) -> Path:
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (size, size), (20 * i, 255 - 20 * i, 100)).save(root / "img" / f"p{i}.png")
        rows.append(f"img/p{i}.png,{1 + (i % 5)}")
    (root / "scores.csv").write_text("image,mos\n" + "\n".join(rows) + "\n")
    return root


def test_help_explains_every_step():
    out = qfm("--help")
    assert out.returncode == 0
    for step in ("ingest", "validate", "demo-data"):
        assert step in out.stdout
    ingest_help = qfm("ingest", "--help").stdout
    assert "--skip-invalid" in ingest_help and "--list-formats" in ingest_help


def test_ingest_then_validate_a_csv_dataset(tmp_path):
    root = write_csv_dataset(tmp_path / "data")
    out = qfm("ingest", "--format", "csv", "--root", str(root), "--out", str(tmp_path / "m"), "--quiet",
              "--option", "score_min=1", "--option", "score_max=5")
    assert out.returncode == 0, out.stderr
    assert "ingested 10 images" in out.stdout
    manifest = read_manifest(tmp_path / "m")
    assert manifest.frame["mos"].tolist() == pytest.approx([(1 + i % 5 - 1) / 4 for i in range(10)])
    assert manifest.split_columns == [f"split_{i}" for i in range(10)]
    report = json.loads((tmp_path / "m" / "ingest_report.json").read_text())
    assert report["splits"]["seed"] == 2024 and report["n_skipped"] == 0
    check = qfm("validate", str(tmp_path / "m"), "--quiet")
    assert check.returncode == 0, check.stderr
    assert "PASSED" in check.stdout
    assert (tmp_path / "m" / "validation.json").is_file() and (tmp_path / "m" / "validation.html").is_file()


def test_validate_fails_naming_the_missing_image(tmp_path):
    root = write_csv_dataset(tmp_path / "data")
    assert qfm("ingest", "--format", "csv", "--root", str(root), "--out", str(tmp_path / "m"), "--quiet",
               "--option", "score_min=1", "--option", "score_max=5").returncode == 0
    (root / "img" / "p3.png").unlink()
    out = qfm("validate", str(tmp_path / "m"), "--quiet")
    assert out.returncode == 2
    assert "img/p3.png" in out.stderr and "does not exist" in out.stderr


def test_validate_fails_on_images_below_the_minimum_size(tmp_path):
    root = write_csv_dataset(tmp_path / "data", size=100)
    assert qfm("ingest", "--format", "csv", "--root", str(root), "--out", str(tmp_path / "m"), "--quiet",
               "--option", "score_min=1", "--option", "score_max=5").returncode == 0
    out = qfm("validate", str(tmp_path / "m"), "--quiet")
    assert out.returncode == 2 and "image narrower than" in out.stderr
    assert qfm("validate", str(tmp_path / "m"), "--quiet", "--min-width", "64", "--min-height", "64").returncode == 0


def test_bad_input_exits_2_with_the_row_named_and_writes_nothing(tmp_path):
    root = write_csv_dataset(tmp_path / "data")
    scores = pd.read_csv(root / "scores.csv")
    scores.loc[4, "mos"] = 9
    scores.to_csv(root / "scores.csv", index=False)
    args = ["ingest", "--format", "csv", "--root", str(root), "--out", str(tmp_path / "m"), "--quiet",
            "--option", "score_min=1", "--option", "score_max=5"]
    out = qfm(*args)
    assert out.returncode == 2
    assert "scores.csv line 6" in out.stderr and "outside the declared range" in out.stderr
    assert not (tmp_path / "m").exists()
    skipped = qfm(*args, "--skip-invalid")
    assert skipped.returncode == 0 and "skipped 1 rows" in skipped.stdout
    report = json.loads((tmp_path / "m" / "ingest_report.json").read_text())
    assert report["n_skipped"] == 1 and report["skipped"][0]["path"] == "img/p4.png"


def test_unknown_format_and_bad_option_are_named(tmp_path):
    out = qfm("ingest", "--format", "koniq", "--root", str(tmp_path), "--out", str(tmp_path / "m"))
    assert out.returncode == 2 and "koniq10k" in out.stderr
    root = write_csv_dataset(tmp_path / "data")
    out = qfm("ingest", "--format", "csv", "--root", str(root), "--out", str(tmp_path / "m"), "--option", "nonsense")
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr


def test_params_file_drives_ingest_and_a_wrong_key_is_rejected(tmp_path):
    root = write_csv_dataset(tmp_path / "data")
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  format: csv\n  root: {root}\n  options: {{score_min: 1, score_max: 5}}\n"
                      "splits:\n  n_splits: 3\n")
    out = qfm("ingest", "--params", str(params), "--out", str(tmp_path / "m"), "--quiet")
    assert out.returncode == 0, out.stderr
    assert read_manifest(tmp_path / "m").split_columns == ["split_0", "split_1", "split_2"]
    params.write_text("splits:\n  n_split: 3\n")
    out = qfm("ingest", "--params", str(params), "--out", str(tmp_path / "m2"))
    assert out.returncode == 2 and "splits.n_split" in out.stderr


def test_demo_data_ingests_and_validates(tmp_path):
    """demo-data reads its sizes from --params (a small demo here: test_demo checks the default sizes)."""
    params = tmp_path / "params.yaml"
    params.write_text("demo: {seed: 0, n_scenes: 3, n_references: 1, n_levels: 2, pool_levels: 1, image_size: 224}\n")
    out = qfm("demo-data", "--out", str(tmp_path / "demo"), "--seed", "1", "--params", str(params))
    assert out.returncode == 0, out.stderr
    scores = pd.read_csv(tmp_path / "demo" / "scores.csv")
    assert set(scores["level"]) == {1, 2} and scores["ref"].nunique() == 4  # 3 scenes and 1 photograph
    with Image.open(tmp_path / "demo" / scores["image"].iloc[0]) as img:
        assert img.size == (224, 224)
    assert qfm("ingest", "--format", "demo", "--root", str(tmp_path / "demo"), "--out", str(tmp_path / "m"),
               "--quiet").returncode == 0
    check = qfm("validate", str(tmp_path / "m"), "--quiet")
    assert check.returncode == 0, check.stderr
