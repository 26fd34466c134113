"""Checkpoints without pickle: safetensors tensors plus a JSON header, loaded without unpickling; pickled
checkpoints of earlier versions are refused with the conversion command, and `qfm convert` reads them with
torch's weights-only loader, so a crafted pickle runs nothing."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from qfm.cli import main
from qfm.errors import DataError
from qfm.train.checkpoint import load_checkpoint, rng_state, save_checkpoint


def training_state() -> dict:
    """What fit() writes to last.safetensors: tensors, an optimizer with int keys and tuples, RNG states."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(), "epoch": 2,
            "history": [{"epoch": 0, "val_srcc": 0.5, "val_error": None, "loss": float("nan")}],
            "best": {"epoch": 1, "value": np.float64(0.75)}, "crop": {"test_grid": (3, 3), "resize": None}}


class Evil:
    """Unpickling this writes a file: what a crafted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle(path, payload) -> None:
    """A pickled .pt with a matching checksum sidecar, as an earlier qfm wrote them."""
    import hashlib

    torch.save(payload, path)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


def test_state_round_trips_through_a_safetensors_file_with_a_json_header(tmp_path):
    state = training_state()
    path = save_checkpoint(state, tmp_path / "last.safetensors")
    back = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(state["model"].values(), back["model"].values()))
    assert list(back["optimizer"]["state"]) == [0, 1]  # int keys survive JSON
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # so do tuples
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["rng"]["numpy"][1].dtype == np.uint32 and np.array_equal(back["rng"]["numpy"][1],
                                                                         state["rng"]["numpy"][1])
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    np.random.set_state(back["rng"]["numpy"])  # the restored states are accepted as they are
    torch.set_rng_state(back["rng"]["torch"])
    assert back["crop"] == {"test_grid": (3, 3), "resize": None} and back["best"]["value"] == 0.75
    assert math.isnan(back["history"][0]["loss"])
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])  # a plain safetensors header: JSON, readable by any tool
    assert json.loads(header["__metadata__"]["qfm"])["epoch"] == 2
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert len(list(handle.keys())) == len(header) - 1


def test_a_value_that_is_not_data_is_refused_when_saving(tmp_path):
    with pytest.raises(DataError, match=r"checkpoint value state.extra is a Evil"):
        save_checkpoint({"extra": Evil(str(tmp_path / "x"))}, tmp_path / "best.safetensors")
    assert not list(tmp_path.iterdir())


def test_a_pickled_checkpoint_is_never_unpickled_on_loading(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "student"
    folder.mkdir()
    write_pickle(folder / "best.pt", {"model": {}, "payload": Evil(str(marker))})
    with pytest.raises(DataError, match=r"best.pt is a pickled PyTorch file of an earlier qfm.*qfm convert"):
        load_checkpoint(folder / "best.pt")
    from qfm.train.fit import load_trained_model

    with pytest.raises(DataError, match=r"qfm convert .*best.pt"):
        load_trained_model(folder / "best.safetensors")  # the new name, only the old file present
    assert main(["score", str(tmp_path), "--model", str(folder), "--quiet"]) == 2
    assert f"qfm convert {folder / 'best.pt'}" in capsys.readouterr().err
    assert main(["convert", str(folder / "best.pt")]) == 2  # the weights-only loader refuses the payload
    err = capsys.readouterr().err
    assert "weights-only loader refuses" in err and "nothing in it ran" in err
    assert not marker.exists() and not (folder / "best.safetensors").exists()


def test_convert_rewrites_an_old_checkpoint_that_then_loads(tmp_path, capsys):
    state = training_state()
    old = tmp_path / "last.pt"
    write_pickle(old, state)
    assert main(["convert", str(old)]) == 0
    assert f"converted {old} -> {tmp_path / 'last.safetensors'}" in capsys.readouterr().out
    back = load_checkpoint(tmp_path / "last.safetensors")
    assert back["epoch"] == 2 and torch.equal(back["model"]["weight"], state["model"]["weight"])
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert main(["convert", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err


def test_weights_can_be_a_qfm_safetensors_checkpoint_or_plain_safetensors(tmp_path):
    from safetensors.torch import save_file

    from qfm.models.weights import read_state_dict

    state = training_state()
    save_checkpoint(state, tmp_path / "best.safetensors")
    assert read_state_dict(tmp_path / "best.safetensors", "best").keys() == state["model"].keys()
    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(tmp_path / "plain.safetensors"))
    assert read_state_dict(tmp_path / "plain.safetensors", "plain").keys() == state["model"].keys()
