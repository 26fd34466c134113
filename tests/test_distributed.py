"""Data-parallel training under torchrun (gloo, 2 CPU ranks) against one process at the same global batch:
the same model, one writer, a killed rank that fails the job and a resume that finishes it, and sharded
DLE and bank passes that give the single process's tables."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from qfm.config import load_params
from qfm.train.checkpoint import LAST, load_checkpoint
from qfm.train.distributed import RankBatches, combine_logs, gather_rows, shard_batch
from qfm.train.sampler import PairBatches, ShuffledBatches, pairs_in_batch

ROOT = Path(__file__).resolve().parents[1]
# A LayerNorm model (timm's tiny test ConvNeXt, random init): BatchNorm would normalise over each rank's
# share of the batch on the CPU (no SyncBatchNorm for gloo), so only a model without it can agree exactly.
TINY = {"model": "qfm_custom", "epochs": 2, "batch_size": 4, "n_crops": 1, "crop_size": 96, "test_grid": "1x2",
        "workers": 0, "warmup_epochs": 0.5, "lr": 5e-4,
        "model_options": {"backbone": "test_convnext", "d": 32, "pretrained": False, "allow_random_init": True}}
# Weights after 16 AdamW steps agree to 3e-6 (measured): the two ranks' half-batch gradients are averaged
# in another summation order than one full-batch mean. A rank that trained on the wrong share, or gradients
# summed instead of averaged, moves them by 1e-2 and more.
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train_teacher"] |= TINY
    params["train_student"] |= TINY | {"qcc": True, "lambda_con": 0.0}
    params["pseudo_label"] |= {"batch_size": 4, "workers": 0}
    params["build_bank"] |= {"descriptor": "teacher", "rule": "aliasing", "tau": 0.05, "batch_size": 4, "workers": 0,
                             "include_pseudo": False}
    params["run"] |= {"threads": 1, "device": "cpu"}
    params["tracking"] |= {"enabled": False}
    path = tmp_path_factory.mktemp("ddp") / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    load_params(path)  # a bad test config fails here, not inside torchrun
    return path


def launch(*command: str, ranks: int = 1) -> list[str]:
    """A Python command line (`-m MODULE ...` or `SCRIPT ...`) as one process or as torchrun's gloo ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*(launcher if ranks > 1 else [sys.executable]), *command]


def run(*command: str, ranks: int = 1) -> subprocess.CompletedProcess:
    """Run `launch(command)` to the end; a failure shows the job's error output."""
    done = subprocess.run(launch(*command, ranks=ranks), check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} on {ranks} rank(s) failed ({done.returncode}):\n"
                             f"{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def teachers(tiny_demo, params_file, tmp_path_factory):
    """The same teacher trained by one process and by 2 ranks (MLflow tracking on for the 2 ranks)."""
    out = tmp_path_factory.mktemp("teachers")
    train = ["-m", "qfm", "train-teacher", "--manifest", str(tiny_demo), "--params", str(params_file), "--quiet"]
    run(*train, "--out", str(out / "one"))
    store = f"sqlite:///{out}/mlflow.db"
    run(*train, "--out", str(out / "two"), "--set", "tracking.enabled=true", "--set", f"tracking.uri={store}",
        "--set", f"tracking.artifacts={out / 'mlartifacts'}", ranks=2)
    return {"one": out / "one", "two": out / "two", "store": store}


def _max_weight_difference(a: Path, b: Path) -> float:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert first.keys() == second.keys()
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


@pytest.mark.slow
def test_two_ranks_train_the_model_one_process_trains(teachers):
    assert _max_weight_difference(teachers["one"] / LAST, teachers["two"] / LAST) < WEIGHT_TOLERANCE
    one = json.loads((teachers["one"] / "history.json").read_text())
    two = json.loads((teachers["two"] / "history.json").read_text())
    assert [r["steps"] for r in two] == [r["steps"] for r in one] == [8, 8]  # 32 images / global batch 4
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["val_srcc"] == pytest.approx(a["val_srcc"], abs=1e-6)
    assert json.loads((teachers["two"] / "summary.json").read_text())["best_epoch"] == \
        json.loads((teachers["one"] / "summary.json").read_text())["best_epoch"]


@pytest.mark.slow
def test_only_rank_zero_writes_one_checkpoint_and_one_mlflow_run(teachers):
    names = sorted(p.name for p in teachers["two"].iterdir())
    assert names == sorted(p.name for p in teachers["one"].iterdir())  # no per-rank or temporary files
    runs = mlflow.MlflowClient(teachers["store"]).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(teachers["store"]).search_experiments()])
    assert [r.data.tags["qfm.step"] for r in runs] == ["train_teacher"]
    assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["summary_best_epoch"] in (0, 1)


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_naming_it_and_resume_finishes(tiny_demo, params_file, teachers, tmp_path):
    out, marker = tmp_path / "killed", tmp_path / "paused"
    env = {"QFM_PAUSE_AT": "step:11", "QFM_PAUSE_RANK": "1", "QFM_PAUSE_MARKER": str(marker)}
    train = ["-m", "qfm", "train-teacher", "--manifest", str(tiny_demo), "--out", str(out), "--params",
             str(params_file), "--quiet"]
    job = subprocess.Popen(launch(*train, ranks=2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", **env}, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():  # rank 1 reached step 11 (epoch 1) and sleeps; rank 0 waits for it
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-2000:]
            time.sleep(0.2)
        os.kill(int(marker.read_text().split()[0]), signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in stderr and "Signal 9 (SIGKILL)" in stderr
    assert load_checkpoint(out / LAST)["epoch"] == 0  # the last finished epoch; nothing half-written
    run(*train, "--resume", ranks=2)
    assert load_checkpoint(out / LAST)["epoch"] == 1
    assert _max_weight_difference(out / LAST, teachers["two"] / LAST) < 1e-6  # as if never interrupted


@pytest.mark.slow
def test_sharded_dle_bank_and_qcc_student_match_one_process(tiny_demo, params_file, teachers, tmp_path):
    for ranks in (1, 2):
        run(str(ROOT / "tests" / "ddp_chain.py"), str(tiny_demo), str(teachers["one"]), str(params_file),
            str(tmp_path / f"ranks{ranks}"), ranks=ranks)
    one, two = tmp_path / "ranks1", tmp_path / "ranks2"
    labels = [pd.read_parquet(r / "pseudo" / "pseudo_labels.parquet") for r in (one, two)]
    assert len(labels[0]) > 0 and labels[0]["image_id"].tolist() == labels[1]["image_id"].tolist()
    np.testing.assert_allclose(labels[1]["score"], labels[0]["score"], atol=1e-5)
    assert labels[1]["kept"].tolist() == labels[0]["kept"].tolist()
    np.testing.assert_allclose(np.load(two / "bank" / "embeddings.npy"), np.load(one / "bank" / "embeddings.npy"),
                               atol=1e-5)
    pairs = [pd.read_parquet(r / "bank" / "pairs.parquet") for r in (one, two)]
    assert len(pairs[0]) > 0
    pd.testing.assert_frame_equal(pairs[1][["anchor_id", "partner_id"]], pairs[0][["anchor_id", "partner_id"]])
    histories = [json.loads((r / "student" / "history.json").read_text()) for r in (one, two)]
    pairs_trained = [[h["n_qcc_pairs"] for h in history] for history in histories]
    assert pairs_trained[0][0] > 0 and pairs_trained[1] == pairs_trained[0]  # no pair cut between ranks
    assert [p.name for p in (two / "student").glob("*.safetensors")] == [p.name for p in (one / "student").glob(
        "*.safetensors")]


@pytest.mark.slow
def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_naming_it(tiny_demo, params_file, tmp_path):
    done = subprocess.run(launch("-m", "qfm", "train-teacher", "--manifest", str(tiny_demo), "--params",
                                 str(params_file), "--out", str(tmp_path), "--set", "train_teacher.batch_size=3",
                                 "--quiet", ranks=2), check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert re.search(r"qfm train-teacher \(rank [01] of 2\): error: batch_size 3 \(the global batch\) does not "
                     r"split evenly over 2 ranks: set it to a multiple of 2", done.stderr)  # torchrun may stop
    # the other rank before it prints the same line
    assert not (tmp_path / LAST).exists()


def test_shards_of_a_global_batch_are_equal_and_cover_it():
    sampler = ShuffledBatches(20, 8, seed=3)
    shares = [list(RankBatches(sampler, rank, 2)) for rank in range(2)]
    assert len(shares[0]) == len(sampler) == 2
    for batch, first, second in zip(sampler, *shares):
        assert first + second == batch and len(first) == len(second) == 4


def test_pairs_stay_on_one_rank_and_shares_stay_equal():
    partners = {a: [(a + 1) % 40, (a + 7) % 40] for a in range(40)}
    sampler = PairBatches(40, 8, partners, seed=1)
    for batch in sampler:
        shares = [shard_batch(batch, rank, 2, partners) for rank in range(2)]
        assert sorted(shares[0] + shares[1]) == sorted(batch) and [len(s) for s in shares] == [4, 4]
        assert sum(len(pairs_in_batch(s, partners)) for s in shares) == len(pairs_in_batch(batch, partners))


def test_an_odd_share_full_of_pairs_trains_the_extra_pair_as_singles():
    partners = {0: [1], 2: [3], 4: [5]}
    shares = [shard_batch([0, 1, 2, 3, 4, 5], rank, 2, partners) for rank in range(2)]
    assert [len(s) for s in shares] == [3, 3] and sorted(shares[0] + shares[1]) == list(range(6))
    assert sum(len(pairs_in_batch(s, partners)) for s in shares) == 2


def test_single_process_helpers_change_nothing():
    index, values = np.array([2, 0]), np.array([0.5, 0.1])
    assert all(a is b for a, b in zip(gather_rows(index, values), (index, values)))
    assert combine_logs({"loss": 0.5, "n_qcc_pairs": 3.0, "steps": 2}, "n_") == {"loss": 0.5, "n_qcc_pairs": 3.0,
                                                                                 "steps": 2}
