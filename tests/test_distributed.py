"""Data-parallel training under torchrun (gloo, 2 CPU ranks) against one process at the same global batch:
the same gradients (a summed reduction fails the comparison) and the same model for the teacher and the QCC
student with pseudo-labels, one writer, a killed rank that fails the job and a resume that finishes it,
sharded DLE and bank passes that give the single process's tables, and a synthetic DLE pool that 2 ranks
label into an s3:// folder without a shared disk."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from qfm.config import load_params
from qfm.losses import LossWeights, global_share, part_statistics, quality_loss, total_loss
from qfm.steps.pseudo_label import pseudo_label
from qfm.storage.s3 import make_client
from qfm.train.checkpoint import LAST, load_checkpoint
from qfm.train.distributed import RankBatches, combine_logs, gather_rows, shard_batch
from qfm.train.sampler import PairBatches, ShuffledBatches, pairs_in_batch

ROOT = Path(__file__).resolve().parents[1]
RUNNER = str(ROOT / "tests" / "ddp_chain.py")
# A LayerNorm model (timm's tiny test ConvNeXt, random init): BatchNorm would normalise over each rank's
# share of the batch on the CPU (no SyncBatchNorm for gloo), so only a model without it can agree exactly.
# No gradient clipping: a clipped gradient hides its scale (a summed gradient clipped to the same norm).
TINY = {"model": "qfm_custom", "epochs": 2, "batch_size": 4, "n_crops": 1, "crop_size": 96, "test_grid": "1x2",
        "workers": 0, "warmup_epochs": 0.5, "lr": 5e-4, "clip_grad": 0.0,
        "model_options": {"backbone": "test_convnext", "d": 32, "pretrained": False, "allow_random_init": True}}
# AdamW is nearly blind to a constant scale of the gradient (a summed reduction trains almost the same
# weights), so the tests compare the gradients the optimiser receives, step by step, as the largest
# difference relative to the largest gradient. Two ranks differ from one process only in summation order.
GRADIENT_TOLERANCE = 1e-4
STEPS_COMPARED = 4  # the first optimiser steps of a run (the first from the same initial weights)
# Weights after 16 AdamW steps agree to 3e-6 (measured): the two ranks' half-batch gradients are averaged
# in another summation order than one full-batch mean. A rank that trained on the wrong share moves them
# by 1e-2 and more.
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train_teacher"] |= TINY
    params["train_student"] |= TINY | {"qcc": True, "lambda_con": 0.0, "use_pseudo_labels": True, "lambda_pl": 0.5}
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


def train_teacher(manifest: Path, params_file: Path, out: Path, *extra: str) -> list[str]:
    """The runner's command line for `qfm train-teacher` (runner options in `extra`, before the command)."""
    return [RUNNER, *extra, "qfm", "train-teacher", "--manifest", str(manifest), "--params", str(params_file),
            "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def teachers(tiny_demo, params_file, tmp_path_factory):
    """The same teacher trained by one process and by 2 ranks (MLflow tracking on for the 2 ranks), with the
    gradients of their first STEPS_COMPARED steps."""
    out = tmp_path_factory.mktemp("teachers")
    record = ["--steps", str(STEPS_COMPARED), "--gradients"]
    run(*train_teacher(tiny_demo, params_file, out / "one", *record, str(out / "one.gradients")))
    store = f"sqlite:///{out}/mlflow.db"
    run(*train_teacher(tiny_demo, params_file, out / "two", *record, str(out / "two.gradients")), "--set",
        "tracking.enabled=true", "--set", f"tracking.uri={store}", "--set",
        f"tracking.artifacts={out / 'mlartifacts'}", ranks=2)
    return {"one": out / "one", "two": out / "two", "store": store,
            "gradients": {n: torch.load(out / f"{n}.gradients") for n in ("one", "two")}}


def _max_weight_difference(a: Path, b: Path) -> float:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert first.keys() == second.keys()
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


def gradient_differences(reference: list[list[torch.Tensor]], other: list[list[torch.Tensor]]) -> list[float]:
    """Per optimiser step: the largest difference of `other`'s gradients from `reference`'s, relative to the
    largest reference gradient."""
    assert len(other) == len(reference) and all(len(a) == len(b) for a, b in zip(reference, other))
    out = []
    for first, second in zip(reference, other):
        scale = max(float(g.abs().max()) for g in first)
        assert scale > 0
        out.append(max(float((a - b).abs().max()) for a, b in zip(first, second)) / scale)
    return out


@pytest.mark.slow
def test_two_ranks_train_the_model_one_process_trains(teachers):
    one, two = teachers["gradients"]["one"], teachers["gradients"]["two"]
    assert len(one) == STEPS_COMPARED
    assert max(gradient_differences(one, two)) < GRADIENT_TOLERANCE
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
def test_a_summed_gradient_reduction_fails_the_gradient_comparison(tiny_demo, params_file, teachers, tmp_path):
    """The comparison above can fail: the same 2-rank run with a DDP hook that sums the ranks' gradients
    (tests/ddp_chain.py --summed-gradients, test-only) gives twice the one-process gradient."""
    run(*train_teacher(tiny_demo, params_file, tmp_path / "summed", "--summed-gradients", "--stop",
                       "--gradients", str(tmp_path / "summed.gradients")), ranks=2)
    summed = torch.load(tmp_path / "summed.gradients")
    one = teachers["gradients"]["one"][:1]
    assert gradient_differences(one, summed)[0] > 100 * GRADIENT_TOLERANCE
    assert gradient_differences([[2 * g for g in one[0]]], summed)[0] < GRADIENT_TOLERANCE


@pytest.fixture(scope="module")
def chains(tiny_demo, params_file, teachers, tmp_path_factory):
    """The DLE -> SNM -> QCC student chain (with pseudo-labels) by one process and by 2 ranks, with the
    student's gradients of its first STEPS_COMPARED steps."""
    out = tmp_path_factory.mktemp("chains")
    for ranks in (1, 2):
        run(RUNNER, "--steps", str(STEPS_COMPARED), "--gradients", str(out / f"ranks{ranks}.gradients"), "chain",
            str(tiny_demo), str(teachers["one"]), str(params_file), str(out / f"ranks{ranks}"), ranks=ranks)
    return {"one": out / "ranks1", "two": out / "ranks2",
            "gradients": {n: torch.load(out / f"ranks{r}.gradients") for n, r in (("one", 1), ("two", 2))}}


@pytest.mark.slow
def test_sharded_dle_and_bank_match_one_process(chains):
    one, two = chains["one"], chains["two"]
    labels = [pd.read_parquet(r / "pseudo" / "pseudo_labels.parquet") for r in (one, two)]
    assert len(labels[0]) > 0 and labels[0]["image_id"].tolist() == labels[1]["image_id"].tolist()
    np.testing.assert_allclose(labels[1]["score"], labels[0]["score"], atol=1e-5)
    assert labels[1]["kept"].tolist() == labels[0]["kept"].tolist()
    np.testing.assert_allclose(np.load(two / "bank" / "embeddings.npy"), np.load(one / "bank" / "embeddings.npy"),
                               atol=1e-5)
    pairs = [pd.read_parquet(r / "bank" / "pairs.parquet") for r in (one, two)]
    assert len(pairs[0]) > 0
    pd.testing.assert_frame_equal(pairs[1][["anchor_id", "partner_id"]], pairs[0][["anchor_id", "partner_id"]])


@pytest.mark.slow
def test_two_ranks_train_the_qcc_student_with_pseudo_labels_one_process_trains(chains):
    """QCC pairs and pseudo-labelled images fall unevenly on the ranks (a rank may have none): each loss part
    is normalised by its count over all ranks, so the gradients are the one process's."""
    one, two = chains["one"], chains["two"]
    summary = json.loads((one / "student" / "summary.json").read_text())
    assert summary["qcc"] and summary["n_pseudo"] > 0 and summary["n_labelled"] > 0
    assert max(gradient_differences(chains["gradients"]["one"], chains["gradients"]["two"])) < GRADIENT_TOLERANCE
    assert _max_weight_difference(one / "student" / LAST, two / "student" / LAST) < WEIGHT_TOLERANCE
    histories = [json.loads((r / "student" / "history.json").read_text()) for r in (one, two)]
    pairs_trained = [[h["n_qcc_pairs"] for h in history] for history in histories]
    assert pairs_trained[0][0] > 0 and pairs_trained[1] == pairs_trained[0]  # no pair cut between ranks
    for a, b in zip(*histories):
        assert a.keys() == b.keys() and {"loss_qcc", "loss_pseudo"} <= a.keys()
        for key in ("loss", "loss_quality", "loss_pseudo", "loss_qcc", "val_srcc"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert [p.name for p in (two / "student").glob("*.safetensors")] == [p.name for p in (one / "student").glob(
        "*.safetensors")]


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"qfm-ddp-{uuid.uuid4().hex[:12]}"
    make_client().create_bucket(Bucket=name)
    return name


@pytest.mark.slow
def test_two_ranks_label_a_synthetic_pool_into_s3_without_a_shared_disk(tiny_demo, params_file, teachers, bucket,
                                                                        tmp_path, one_torch_thread):
    """Rank 1's output folder is a private temporary one (rank 0 stages the s3:// folder): each rank generates
    the synthetic pool itself and checks it has rank 0's bytes, and every pool image is labelled as by one
    process."""
    params = load_params(params_file)
    synthetic = dataclasses.replace(params["pseudo_label"], pool="synthetic")
    expected = pseudo_label(tiny_demo, teachers["one"], tmp_path / "one", synthetic, params["run"], progress=False)
    scratch = tmp_path / "tmp"  # the ranks' temporary folders
    scratch.mkdir()
    done = subprocess.run(
        launch("-m", "qfm", "pseudo-label", "--manifest", str(tiny_demo), "--teacher", str(teachers["one"]),
               "--params", str(params_file), "--set", "pseudo_label.pool=synthetic", "--out", f"s3://{bucket}/pseudo",
               "--cache", str(tmp_path / "cache"), "--quiet", ranks=2),
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stderr[-3000:]
    client = make_client()
    table = pd.read_parquet(io.BytesIO(client.get_object(Bucket=bucket, Key="pseudo/pseudo_labels.parquet")["Body"].read()))
    summary = json.loads(client.get_object(Bucket=bucket, Key="pseudo/summary.json")["Body"].read())
    reference = pd.read_parquet(tmp_path / "one" / "pseudo_labels.parquet")
    assert expected["n_pool"] > 0 and summary["n_pool"] == expected["n_pool"] == len(table)
    assert summary["n_unreadable"] == 0 and table["error"].isna().all() and table["score"].notna().all()
    assert table["image_id"].tolist() == reference["image_id"].tolist()
    np.testing.assert_allclose(table["score"], reference["score"], atol=1e-5)
    assert table["kept"].tolist() == reference["kept"].tolist() and summary["n_kept"] == expected["n_kept"]
    listed = client.list_objects_v2(Bucket=bucket, Prefix="pseudo/pool/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(f"pseudo/{p}" for p in table["path"])
    assert not list(scratch.glob("qfm-pool-*"))  # rank 1's copy of the pool is gone


def test_each_loss_part_is_averaged_over_the_global_batch_whatever_share_each_rank_holds():
    """Two ranks' shares, one with every QCC item and the only pseudo-labelled item: the ranks' gradients of
    global_share, averaged as DDP averages them, are one process's gradient of the whole batch; averaging the
    ranks' own means (the old rule) is not."""
    torch.manual_seed(0)
    x, target = torch.randn(6, 3), torch.rand(6)
    weights = LossWeights(lambda_qcc=0.5, lambda_pl=0.5)
    shares = {"quality": ([0, 1], [3, 4, 5]), "pseudo": ([2], []), "qcc": ([0, 1], [])}

    def parts(model, rows_of):
        pred = model(x)[:, 0]
        made = {name: quality_loss(pred[rows] if name != "qcc" else pred[rows] * 0.9, target[rows])
                for name, rows in rows_of.items() if rows}
        return made, {name: len(rows) for name, rows in rows_of.items() if rows}

    def model() -> torch.nn.Module:
        made = torch.nn.Linear(3, 1)
        torch.nn.init.constant_(made.weight, 0.3)
        torch.nn.init.constant_(made.bias, 0.1)
        return made

    def gradient(loss_of) -> torch.Tensor:
        made = model()
        loss_of(made).backward()
        return torch.cat([made.weight.grad.flatten(), made.bias.grad])

    whole = {name: rows[0] + rows[1] for name, rows in shares.items()}
    expected_log = total_loss(parts(model(), whole)[0], weights)[1]
    one_process = gradient(lambda m: total_loss(parts(m, whole)[0], weights)[0])
    rank_rows = [{name: rows[r] for name, rows in shares.items()} for r in (0, 1)]
    with torch.no_grad():
        statistics = [part_statistics(*parts(model(), rows)) for rows in rank_rows]
    totals = [a + b for a, b in zip(*statistics)]
    ranks = [gradient(lambda m, rows=rows: global_share(*parts(m, rows), totals, weights, 2)[0]) for rows in rank_rows]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, one_process, rtol=1e-6, atol=1e-7)
    old = [gradient(lambda m, rows=rows: total_loss(parts(m, rows)[0], weights)[0]) for rows in rank_rows]
    assert not torch.allclose((old[0] + old[1]) / 2, one_process, rtol=1e-3)
    log = global_share(*parts(model(), rank_rows[1]), totals, weights, 2)[1]
    assert log.keys() == expected_log.keys() and all(log[k] == pytest.approx(expected_log[k]) for k in log)


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


def test_a_rank_whose_synthetic_pool_differs_from_rank_zeros_is_refused_naming_it(monkeypatch, tmp_path):
    """Generation must give every rank the same bytes (other library builds may not): rank 1 compares its pool
    with rank 0's (the collectives replaced by what rank 0 would send) and every rank stops naming the image."""
    import qfm.steps.pseudo_label as module
    from qfm.errors import DataError
    from qfm.train.distributed import Ranks

    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "a.png").write_bytes(b"rank 1's bytes")
    (tmp_path / "pool" / "b.png").write_bytes(b"the same")
    pool = pd.DataFrame({"path": ["pool/a.png", "pool/b.png"], "content_id": ["x", "y"]})
    same = module._sha256(tmp_path / "pool" / "b.png")
    monkeypatch.setattr(module, "ranks", lambda: Ranks(1, 2))
    monkeypatch.setattr(module, "from_main", lambda _mine: [("pool/a.png", "x", "0" * 64), ("pool/b.png", "y", same)])
    monkeypatch.setattr(module, "gather_dict", lambda mine: {0: [], **mine})
    with pytest.raises(DataError, match=r"rank 1 generated differs from rank 0's \(1 image\(s\), e.g. pool/a.png\)"):
        module.check_same_pool(pool, tmp_path)
    monkeypatch.setattr(module, "from_main", lambda mine: mine)  # rank 0's very bytes: no error
    module.check_same_pool(pool, tmp_path)
