"""Surviving faults: training SIGKILLed mid-epoch and mid-checkpoint-upload resumes from S3 to the very result of
an uninterrupted run; a checkpoint write killed at either rename leaves a loadable checkpoint; corrupt or
partial checkpoints are refused, never loaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qfm.cli import main
from qfm.data.manifest import read_manifest
from qfm.errors import DataError
from qfm.faults import PAUSE_AT, PAUSE_MARKER
from qfm.storage.s3 import download_prefix, file_digests, head_object, make_client
from qfm.train.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint

EPOCHS = 3
BATCH = 4
TINY = ["--set", "run.device=cpu", "--quiet"] + [
    arg for item in (f"epochs={EPOCHS}", f"batch_size={BATCH}", "n_crops=1", "crop_size=96", "test_grid=1x2", "workers=0",
                     "warmup_epochs=0.5", "lr=0.0005")
    for arg in ("--set", f"train_teacher.{item}")]


def _start(args: list[str], env: dict[str, str], pause_at: str | None = None, marker: Path | None = None):
    env = env | {"OMP_NUM_THREADS": "1"}  # the same thread count in every run: bitwise-equal CPU results
    if pause_at:
        env |= {PAUSE_AT: pause_at, PAUSE_MARKER: str(marker)}
    return subprocess.Popen([sys.executable, "-m", "qfm.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_when_paused(process: subprocess.Popen, marker: Path, timeout: float = 180) -> str:
    """Wait until the process reports it is paused at its point, then SIGKILL its process group."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited ({process.returncode}) before its pause point: {process.stderr.read()}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("never reached its pause point")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    point = marker.read_text().split()[1]
    marker.unlink()
    return point


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return out


def _steps_per_epoch(manifest_dir: Path) -> int:
    """Training steps per epoch on split_0: its train images in batches of BATCH, the last partial one dropped."""
    frame = read_manifest(manifest_dir).frame
    return int((frame["split_0"] == "train").sum()) // BATCH


def _model(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_training_killed_twice_resumes_from_s3_to_the_uninterrupted_result(tiny_demo, s3_env, tmp_path):
    env = os.environ | s3_env
    client = make_client()
    client.create_bucket(Bucket="faults")
    uri = "s3://faults/runs/teacher"
    straight = _start(["train-teacher", "--manifest", str(tiny_demo), "--out", str(tmp_path / "straight"), *TINY],
                      env)
    resumable = ["train-teacher", "--manifest", str(tiny_demo), "--out", uri, "--resume", *TINY]
    marker, node = tmp_path / "paused", tmp_path / "node-cache"
    steps_per_epoch = _steps_per_epoch(tiny_demo)

    # 1: SIGKILL mid-epoch 1 (after epoch 0's checkpoint reached S3).
    mid_epoch = steps_per_epoch + 4
    first = _start([*resumable, "--cache", str(node)], env, f"step:{mid_epoch}", marker)
    assert _kill_when_paused(first, marker) == f"step:{mid_epoch}"
    download_prefix(uri, tmp_path / "after-kill-1", client)
    assert load_checkpoint(tmp_path / "after-kill-1" / LAST)["epoch"] == 0

    # 2: same machine, resume; SIGKILL while the checkpoint of epoch 1 is being committed to S3: last.safetensors is up,
    # its sidecar object is still the previous one.
    second = _start([*resumable, "--cache", str(node)], env, "upload:last.safetensors", marker)
    assert _kill_when_paused(second, marker) == "upload:last.safetensors"
    stale_sidecar = client.get_object(Bucket="faults", Key="runs/teacher/last.safetensors.sha256")["Body"].read().decode()
    shutil.rmtree(tmp_path / "after-kill-1")
    download_prefix(uri, tmp_path / "after-kill-2", client)
    actual = file_digests(tmp_path / "after-kill-2" / LAST)[0]
    assert stale_sidecar.strip() != actual == head_object(f"{uri}/{LAST}", client).sha256

    # 3: a fresh machine (empty cache) resumes from S3 at epoch 2; it must not redo epoch 1 (a pause point
    # at epoch 1's last step would stop it), and ends where the uninterrupted run ended.
    third = _start([*resumable, "--cache", str(tmp_path / "new-node")], env,
                   f"step:{2 * steps_per_epoch - 1}", marker)
    log = _finish(third)
    assert not marker.exists(), "the resumed run redid an epoch it had a checkpoint for"
    assert "fetched s3://faults/runs/teacher" in log and "uploaded" in log
    _finish(straight)

    final = tmp_path / "final"
    download_prefix(uri, final, client)
    a, b = tmp_path / "straight", final
    history_a, history_b = (json.loads((d / "history.json").read_text()) for d in (a, b))
    assert [h["epoch"] for h in history_b] == list(range(EPOCHS))
    assert [h["steps"] for h in history_a] == [steps_per_epoch] * EPOCHS  # the pause points above assume it
    for key in ("loss", "val_srcc", "val_plcc_raw", "val_rmse_raw", "lr"):
        assert [h[key] for h in history_a] == [h[key] for h in history_b], key
    summary_a, summary_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert summary_a["best_epoch"] == summary_b["best_epoch"] and summary_a["val"] == summary_b["val"]
    for name in (BEST, LAST):
        model_a, model_b = _model(a / name), _model(b / name)
        assert model_a.keys() == model_b.keys()
        for key in model_a:
            assert torch.equal(model_a[key], model_b[key]), f"{name}: {key}"


KILLED_WRITER = """
import sys, torch
from qfm.train.checkpoint import save_checkpoint
save_checkpoint({"version": torch.tensor(2)}, sys.argv[1])
"""


@pytest.mark.parametrize("point, survivor", [("tmp-written", 1), ("renamed", 2)])
def test_checkpoint_write_killed_at_either_rename_leaves_a_loadable_checkpoint(tmp_path, point, survivor):
    path = save_checkpoint({"version": torch.tensor(1)}, tmp_path / LAST)
    marker = tmp_path / "paused"
    env = os.environ | {PAUSE_AT: f"write:{LAST}:{point}", PAUSE_MARKER: str(marker)}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], env=env, start_new_session=True,
                              stderr=subprocess.PIPE, text=True)
    assert _kill_when_paused(writer, marker) == f"write:{LAST}:{point}"
    leftovers = sorted(p.name for p in tmp_path.glob(".*.tmp-*"))
    assert leftovers, "the killed writer left its temporary files"
    assert int(load_checkpoint(path)["version"]) == survivor
    assert (tmp_path / f"{LAST}.sha256").read_text().strip() == file_digests(path)[0]
    save_checkpoint({"version": torch.tensor(3)}, path)
    assert not list(tmp_path.glob(".*.tmp-*")), "the next write clears what a killed writer left"
    assert int(load_checkpoint(path)["version"]) == 3


def test_corrupt_or_partial_checkpoints_are_refused_and_never_loaded(tmp_path):
    path = save_checkpoint({"weights": torch.arange(1000.0)}, tmp_path / LAST)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))  # same size, one bit pattern changed
    with pytest.raises(DataError, match=r"last\.safetensors is corrupt or partial \(checksum mismatch"):
        load_checkpoint(path)
    path.write_bytes(good[: len(good) // 3])  # a partial file
    with pytest.raises(DataError, match="corrupt or partial"):
        load_checkpoint(path)
    (tmp_path / f"{LAST}.sha256").unlink()
    with pytest.raises(DataError, match="has no checksum file last.safetensors.sha256"):
        load_checkpoint(path)


def test_resume_refuses_a_corrupt_last_checkpoint_by_name(tiny_demo, tmp_path, capsys):
    out = tmp_path / "teacher"
    save_checkpoint({"model": {}, "epoch": 0}, out / LAST)
    data = (out / LAST).read_bytes()
    (out / LAST).write_bytes(data[:-10])
    code = main(["train-teacher", "--manifest", str(tiny_demo), "--out", str(out), "--resume", *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{out / LAST} is corrupt or partial" in err and "refusing to load it" in err
    assert (out / LAST).read_bytes() == data[:-10], "the refused checkpoint is left as it was for inspection"
    assert not (out / BEST).exists()
