"""`qfm export` (ONNX, TorchScript) and `qfm score --engine onnxruntime` on a tiny trained demo model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from qfm.cli import main
from qfm.config import RunParams, StudentParams
from qfm.eval.metrics import srcc
from qfm.export import CROP_KEY, read_torchscript
from qfm.steps.score import score_images
from qfm.train.fit import load_trained_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = StudentParams(epochs=1, batch_size=4, n_crops=1, crop_size=96, test_grid="1x2", workers=0, qcc=False,
                     use_pseudo_labels=False)
TOLERANCE = 1e-4  # per image score, torch against the export


@pytest.fixture(scope="module")
def student(tiny_demo, tmp_path_factory, one_torch_thread) -> Path:
    """A one-epoch student on the tiny demo, exported by the command to model.onnx and model.ts beside best.safetensors."""
    from qfm.steps.student import train_student

    out = tmp_path_factory.mktemp("export") / "student"
    train_student(tiny_demo, out, TINY, RunParams(device="cpu"), progress=False)
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts")):
        assert main(["export", "--model", str(out), "--format", fmt, "--out", str(out / name)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tiny_demo) -> list[Path]:
    return sorted((tiny_demo.parent / "demo" / "images").glob("*.png"))


def crops(n: int, size: int = 96) -> torch.Tensor:
    """n random uint8 crops (n, size, size, 3)."""
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def torch_scores(student: Path, nhwc: torch.Tensor) -> np.ndarray:
    """The trained model's own scores of uint8 crops (its prepare() normalises them)."""
    model, _ = load_trained_model(student / "best.safetensors")
    with torch.no_grad():
        return model(nhwc.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)).numpy()


def test_onnxruntime_scores_match_torch_per_image_and_in_rank(student, images, tmp_path):
    """The onnxruntime engine (numpy crops, no torch loader) gives the torch engine's table: the same scores
    within TOLERANCE, and the same error for a file that does not decode."""
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    files = [*images[:3], junk, *images[3:]]
    ref = score_images(student, files, device="cpu", workers=0, progress=False, batch_size=4)
    ort = score_images(student / "model.onnx", files, workers=0, progress=False, engine="onnxruntime", batch_size=4)
    assert list(ort.columns) == list(ref.columns) == ["path", "score", "crop_std", "error"]
    assert list(ort["path"]) == list(ref["path"]) and len(ort) == len(images) + 1 > 10
    assert ort["error"].tolist() == ref["error"].tolist()
    assert ort["error"].notna().tolist() == [i == 3 for i in range(len(files))]
    assert ort.loc[3, "error"].startswith(f"image list entry 3: cannot decode image {junk}")
    ort, ref = ort.drop(index=3), ref.drop(index=3)
    assert ort[["score", "crop_std"]].notna().all().all()
    diff = np.abs(ort["score"].to_numpy() - ref["score"].to_numpy())
    print(f"max |torch - onnxruntime| per image score over {len(diff)} images: {diff.max():.2e}")
    assert diff.max() <= TOLERANCE
    assert np.abs(ort["crop_std"] - ref["crop_std"]).max() <= TOLERANCE
    assert (np.argsort(ort["score"].to_numpy(), kind="stable") ==
            np.argsort(ref["score"].to_numpy(), kind="stable")).all()


def test_onnx_graph_takes_uint8_nhwc_crops_with_a_dynamic_batch_and_carries_metadata(student):
    proto = onnx.load(str(student / "model.onnx"))
    (graph_input,) = proto.graph.input
    tensor = graph_input.type.tensor_type
    assert graph_input.name == "crops" and tensor.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    assert dims == ["batch", 96, 96, 3]
    meta = {p.key: p.value for p in proto.metadata_props}
    summary = json.loads((student / "summary.json").read_text())
    assert meta["qfm.crop_grid"] == "1x2" and meta["qfm.input_size"] == "96x96"
    assert meta["qfm.score_scale"].startswith("0-1, higher is better")
    assert json.loads(meta["qfm.val_metrics"])["srcc"] == pytest.approx(summary["val"]["srcc"])
    assert len(meta["qfm.train_data_version"]) == 64 and len(meta["qfm.checkpoint_sha256"]) == 64
    assert json.loads(meta[CROP_KEY])["dtype"] == "uint8"
    session = onnxruntime.InferenceSession(str(student / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # neither is the batch of 2 the export traced
        out = session.run(None, {"crops": crops(n).numpy()})[0]
        assert out.shape == (n,) and np.abs(out - torch_scores(student, crops(n))).max() <= TOLERANCE


def test_torchscript_export_loads_and_matches(student):
    module, meta = read_torchscript(student / "model.ts")
    assert meta == {p.key: p.value for p in onnx.load(str(student / "model.onnx")).metadata_props}
    for n in (1, 3):
        with torch.no_grad():
            out = module(crops(n)).numpy()
        assert out.shape == (n,) and np.abs(out - torch_scores(student, crops(n))).max() <= TOLERANCE


def test_score_command_runs_the_onnx_in_a_model_folder(student, images, tmp_path):
    out = tmp_path / "scores.csv"
    assert main(["score", *map(str, images[:3]), "--model", str(student), "--engine", "onnxruntime",
                 "--out", str(out), "--workers", "0", "--quiet"]) == 0
    assert out.read_text().splitlines()[0] == "path,score,crop_std,error"


def test_bad_input_is_named_with_a_non_zero_exit(student, images, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["export", "--model", str(missing), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert f"no trained model at {missing}: it does not exist; pass a trained model folder" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert f"no trained model at {tmp_path / 'best.safetensors'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(student), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.tflite").exists()
    score = ["score", str(images[0]), "--engine", "onnxruntime", "--quiet", "--workers", "0"]
    assert main([*score, "--model", str(tmp_path)]) == 2
    assert f"--model {tmp_path} holds no model.onnx" in capsys.readouterr().err
    assert main([*score, "--model", str(student / "best.safetensors")]) == 2
    assert "is not a .onnx file" in capsys.readouterr().err
    assert main([*score, "--model", str(student), "--device", "cuda"]) == 2
    assert "runs on the CPU" in capsys.readouterr().err


def test_int8_export_is_written_only_within_the_validation_gate(student, tiny_demo, images, tmp_path, capsys):
    """--int8 calibrates on train images and compares validation SRCC with the fp32 model: a loss within
    --max-loss writes an int8 file that scores through onnxruntime; otherwise nothing is written, exit 1."""
    out = tmp_path / "int8.onnx"
    base = ["export", "--model", str(student), "--format", "onnx", "--out", str(out), "--int8", "--calibrate",
            str(tiny_demo), "--calibration-images", "8"]
    assert main(base + ["--max-loss", "-1"]) == 1  # a loss of at least -1 is always there: refused
    assert "int8 not written: it loses more than -1.0 SRCC; validation SRCC on split_0" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))

    assert main(base + ["--max-loss", "1"]) == 0
    printed = capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    gate = json.loads(meta["qfm.int8"])
    assert gate["calibration_images"] == 8 and gate["split"] == "split_0" and gate["max_loss"] == 1
    assert f"fp32 {gate['val_srcc_fp32']:.4f}, int8 {gate['val_srcc_int8']:.4f}" in printed
    assert CROP_KEY in meta  # the crop settings travel, so the scorer cuts the same crops
    types = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= types
    scored = score_images(out, images, workers=0, progress=False, engine="onnxruntime")
    fp32 = score_images(student / "model.onnx", images, workers=0, progress=False, engine="onnxruntime")
    assert scored["error"].isna().all() and not np.allclose(scored["score"], fp32["score"], atol=1e-4)
    assert srcc(scored["score"], fp32["score"]) > 0.8  # the same model in 8 bits: the same ranking, roughly


def test_int8_needs_onnx_and_a_calibration_manifest(student, tmp_path, capsys):
    assert main(["export", "--model", str(student), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--int8"]) == 2
    assert "--int8 needs --format onnx and --calibrate MANIFEST" in capsys.readouterr().err


def test_export_records_the_split_the_model_was_chosen_on(student, tiny_demo):
    """Training records its split's name and the digest of its validation image ids; the export carries them."""
    from qfm.data.manifest import read_manifest
    from qfm.data.splits import part_digest

    frame = read_manifest(tiny_demo).frame
    recorded = json.loads({p.key: p.value for p in onnx.load(str(student / "model.onnx")).metadata_props}
                          ["qfm.val_split"])
    assert recorded == {"name": "split_0", "val_ids_sha256": part_digest(frame, "split_0", "val")}
    assert recorded["val_ids_sha256"] != part_digest(frame, "split_1", "val")


def test_int8_gate_on_another_validation_part_is_refused(student, tiny_demo, tmp_path, capsys):
    """--split split_1, or split_0 of a manifest whose split_0 validation part differs (one image moved to
    train): the gate would judge on other images than the model was chosen on, so nothing is quantised."""
    from qfm.data.manifest import read_manifest, write_manifest

    out = tmp_path / "int8.onnx"
    base = ["export", "--model", str(student), "--format", "onnx", "--out", str(out), "--int8",
            "--calibration-images", "8"]
    assert main(base + ["--calibrate", str(tiny_demo), "--split", "split_1"]) == 2
    err = capsys.readouterr().err
    assert f"--split split_1 of manifest {tiny_demo}: its validation images (digest " in err
    assert "are not the ones the model was chosen on (split split_0, digest " in err and "pass --split split_0" in err
    manifest = read_manifest(tiny_demo)
    moved = manifest.frame.index[manifest.frame["split_0"] == "val"][0]
    manifest.frame.loc[moved, "split_0"] = "train"
    write_manifest(manifest, tmp_path / "other")
    assert main(base + ["--calibrate", str(tmp_path / "other"), "--split", "split_0"]) == 2
    assert "--split split_0 of manifest" in capsys.readouterr().err and not out.exists()


def test_a_model_of_an_older_qfm_is_gated_on_its_split_name_only(student, tiny_demo):
    """No digest recorded: the split's name from summary.json beside the checkpoint must match; with neither,
    the gate refuses (it cannot check)."""
    from qfm.errors import ConfigError
    from qfm.export import recorded_split
    from qfm.quantize import check_split

    assert recorded_split(student / "best.safetensors", {}) == {"name": "split_0"}  # from summary.json
    check_split({"name": "split_0"}, tiny_demo, "split_0")
    with pytest.raises(ConfigError, match=r"--split split_1 is not the split the model was trained on \(split_0; it "
                                          r"records no digest.*pass --split split_0"):
        check_split({"name": "split_0"}, tiny_demo, "split_1")
    with pytest.raises(ConfigError, match="records neither its split nor its validation images"):
        check_split({}, tiny_demo, "split_0")
