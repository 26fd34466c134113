"""The training-time `qfm` steps from the command line on the tiny demo, and `qfm score`'s reporting."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from test_cli import qfm

from qfm.config import load_params
from qfm.errors import ConfigError

TINY = ["--set", "run.device=cpu"] + [
    arg for item in ("epochs=1", "batch_size=4", "n_crops=1", "crop_size=96", "test_grid=1x2", "workers=0")
    for section in ("train_teacher", "train_student") for arg in ("--set", f"{section}.{item}")
] + ["--set", "pseudo_label.workers=0", "--set", "build_bank.workers=0", "--set", "build_bank.tau=0.05"]


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-chain")
    m = str(tiny_demo)
    steps = [
        ["train-teacher", "--manifest", m, "--out", str(out / "teacher")],
        ["pseudo-label", "--manifest", m, "--teacher", str(out / "teacher"), "--out", str(out / "pseudo")],
        ["build-bank", "--manifest", m, "--teacher", str(out / "teacher"), "--pseudo", str(out / "pseudo"),
         "--out", str(out / "bank")],
        ["train-student", "--manifest", m, "--teacher", str(out / "teacher"), "--pseudo", str(out / "pseudo"),
         "--bank", str(out / "bank"), "--out", str(out / "student")],
        ["evaluate", "--manifest", m, "--model", str(out / "student"), "--out", str(out / "eval")],
    ]
    logs = []
    for args in steps:
        result = qfm(*args, *TINY, "--quiet")
        assert result.returncode == 0, f"{args[0]}: {result.stderr}"
        logs.append(result.stdout)
    return out, logs


def test_each_step_reports_what_it_wrote(trained):
    out, logs = trained
    assert "teacher: best epoch 0 by val srcc" in logs[0]
    assert "pseudo-labels: kept" in logs[1] and "left out as held-out content" in logs[1]
    assert "'aliasing' pairs" in logs[2]
    assert "QCC on" in logs[3]
    assert "PLCC raw" in logs[4] and "PLCC logistic-fitted" in logs[4]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    assert f"SRCC {metrics['srcc']:.4f}" in logs[4]


def test_score_writes_every_image_and_reports_unreadable_ones(trained, tiny_demo, tmp_path):
    out, _ = trained
    images = tmp_path / "imgs"
    images.mkdir()
    demo_images = sorted((tiny_demo.parent / "demo" / "images").glob("*.png"))[:3]
    for path in demo_images:
        shutil.copy(path, images / path.name)
    (images / "broken.png").write_bytes(b"not a png at all")
    result = qfm("score", str(images), "--model", str(out / "student"), "--out", str(tmp_path / "s.csv"),
                 "--workers", "0", "--device", "cpu", "--quiet")
    assert result.returncode == 1
    assert "broken.png" in result.stderr and "1 image(s) could not be read" in result.stderr
    table = pd.read_csv(tmp_path / "s.csv")
    assert len(table) == 4
    good = table[table["error"].isna()]
    assert len(good) == 3 and good["score"].between(-0.5, 1.5).all()
    again = qfm("score", *[str(p) for p in demo_images], "--model", str(out / "student" / "best.safetensors"),
                "--workers", "0", "--device", "cpu", "--quiet")
    assert again.returncode == 0
    lines = again.stdout.strip().splitlines()
    assert lines[0] == "path,score,crop_std,error" and len(lines) == 4
    first = {row.split(",")[0]: float(row.split(",")[1]) for row in lines[1:]}
    for path, score in zip(table["path"], table["score"]):
        name = path.rsplit("/", 1)[-1]
        match = [v for k, v in first.items() if k.endswith(name)]
        if match:
            assert match[0] == pytest.approx(score, abs=1e-6)


def test_overrides_are_validated():
    params = load_params(None, overrides=["train_student.lambda_qcc=0", "build_bank.rule=semantic"])
    assert params["train_student"].lambda_qcc == 0 and params["build_bank"].rule == "semantic"
    with pytest.raises(ConfigError, match="train_student.lamda_qcc"):
        load_params(None, overrides=["train_student.lamda_qcc=0"])
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_params(None, overrides=["lambda_qcc=0"])
