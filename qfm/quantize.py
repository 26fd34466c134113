"""An int8 form of an ONNX export: onnxruntime's static quantisation, calibrated on training images, and
offered only when it keeps the ranking.

Calibration feeds the test-grid crops of up to `n_calibration` images of the split's *train* part
(a fixed random sample) to onnxruntime's `quantize_static` (QDQ format, per-channel int8 weights, uint8
activations; reduce_range keeps the 8-bit products inside 16 bits on CPUs without VNNI). The gate then
scores the split's *validation* part with the fp32 and the int8 model (the same crops) and refuses the
int8 file when its SRCC is more than `max_loss` below the fp32 one: the test part is never looked at. The
split must be the one the model was chosen on (check_split: the digest of its validation image ids, recorded
at training), or the gate would judge on images the model's selection never saw, or on its training images.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qfm.data.manifest import read_manifest
from qfm.data.splits import part_digest, part_mask
from qfm.data.torch_dataset import CropConfig, ImageListDataset
from qfm.errors import ConfigError, DataError
from qfm.eval.metrics import srcc
from qfm.export import CROP_KEY, INPUT_NAME, VAL_SPLIT_KEY

MAX_SRCC_LOSS = 0.005
INT8_KEY = "qfm.int8"  # metadata of the int8 file: the calibration and the gate's figures (JSON)


@dataclass(frozen=True)
class Int8Result:
    """The gate's figures: validation SRCC of both forms, and whether the int8 file was kept."""

    val_srcc_fp32: float
    val_srcc_int8: float
    n_val: int
    n_calibration: int
    kept: bool

    @property
    def loss(self) -> float:
        return self.val_srcc_fp32 - self.val_srcc_int8


def split_paths(manifest_dir: str | Path, split: str, part: str) -> tuple[list[Path], np.ndarray]:
    """The image files and scores of one part of a split."""
    manifest = read_manifest(manifest_dir)
    rows = manifest.frame[part_mask(manifest.frame, split, part)]
    if rows.empty:
        raise DataError(f"split '{split}' of manifest {manifest_dir} has no {part} images")
    return [manifest.image_path(p) for p in rows["path"]], rows["mos"].to_numpy(dtype=float)


def check_split(recorded: dict, manifest_dir: str | Path, split: str) -> None:
    """Refuse a gate on another validation part than the model was chosen on: recorded (the export's
    qfm.val_split) holds the digest of the model's validation image ids, which must equal that of `split`'s
    validation part in this manifest; a model of an older qfm records only its split's name, which must then
    be `split` (the images cannot be checked); a model that records neither is refused."""
    frame = read_manifest(manifest_dir).frame
    digest = part_digest(frame, split, "val")
    name, expected = recorded.get("name"), recorded.get("val_ids_sha256")
    if expected is not None:
        if digest != expected:
            raise ConfigError(
                f"--split {split} of manifest {manifest_dir}: its validation images (digest {digest[:12]}) are not "
                f"the ones the model was chosen on (split {name}, digest {expected[:12]}), so the int8 gate would "
                f"judge on other images; pass --split {name} and the manifest the model was trained with")
        return
    if name is None:
        raise ConfigError("the model records neither its split nor its validation images (trained by an older qfm, "
                          "with no summary.json beside its checkpoint), so the int8 gate cannot check that "
                          f"--split {split} is the part it was chosen on; retrain it with this qfm, or put the "
                          "training summary.json beside its best.safetensors")
    if name != split:
        raise ConfigError(f"--split {split} is not the split the model was trained on ({name}; it records no digest "
                          f"of its validation images, trained by an older qfm): pass --split {name}")


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol: one image's test-grid crops (N, S, S, 3) at a time."""

    def __init__(self, dataset: ImageListDataset) -> None:
        self.dataset, self.next_index = dataset, 0

    def get_next(self) -> dict | None:
        if self.next_index >= len(self.dataset):
            return None
        item = self.dataset[self.next_index]
        self.next_index += 1
        return {INPUT_NAME: item["image"].permute(0, 2, 3, 1).contiguous().numpy()}


def quantize_file(fp32_file: str | Path, out: str | Path, calibration: ImageListDataset) -> None:
    """onnxruntime's static int8 form of an ONNX export, calibrated on these images' test-grid crops."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="qfm-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_file), str(prepared), skip_symbolic_shape=True)  # the graph's own shapes
        quantize_static(str(prepared), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)


def calibration_images(manifest_dir: str | Path, split: str, crop: CropConfig, count: int,
                       seed: int = 0) -> ImageListDataset:
    """A fixed random sample of count train images of the split, cut into the test grid's crops."""
    train_paths, _ = split_paths(manifest_dir, split, "train")
    pick = np.random.default_rng(seed).permutation(len(train_paths))[:count]
    return ImageListDataset([train_paths[i] for i in sorted(pick)], crop, train=False)


def part_srcc(onnx_file: str | Path, manifest_dir: str | Path, split: str, part: str) -> tuple[float, int]:
    """SRCC of an ONNX model on one part of a split (onnxruntime, the deterministic test crops), and the
    number of images; an unreadable image is a DataError."""
    from qfm.inference import score_files
    from qfm.onnx_engine import load_onnx_model

    paths, mos = split_paths(manifest_dir, split, part)
    model, state = load_onnx_model(onnx_file)
    scored = score_files(model, state, paths, device="cpu", workers=0, progress=False)
    if scored["error"].notna().any():
        raise DataError(f"{part} images of {split} could not be read: {scored['error'].dropna().iloc[0]}")
    return srcc(scored["score"].to_numpy(), mos), len(paths)


def quantize_int8(fp32_file: str | Path, out: str | Path, manifest_dir: str | Path, split: str = "split_0",
                  n_calibration: int = 64, max_loss: float = MAX_SRCC_LOSS, seed: int = 0) -> Int8Result:
    """Write the int8 form of an ONNX export to out if its validation SRCC is within max_loss of the fp32
    one; returns the figures either way (out is not written when refused)."""
    import onnx

    fp32_file, out = Path(fp32_file), Path(out)
    props = _metadata(fp32_file)
    check_split(json.loads(dict(props).get(VAL_SPLIT_KEY, "{}")), manifest_dir, split)
    crop = CropConfig(**json.loads(dict(props)[CROP_KEY]))
    calibration = calibration_images(manifest_dir, split, crop, n_calibration, seed)
    with tempfile.TemporaryDirectory(prefix="qfm-int8-") as tmp:
        quantized = Path(tmp) / "int8.onnx"
        quantize_file(fp32_file, quantized, calibration)
        scores = {name: part_srcc(file, manifest_dir, split, "val")
                  for name, file in (("fp32", fp32_file), ("int8", quantized))}
        n_val = scores["fp32"][1]
        scores = {name: value for name, (value, _) in scores.items()}
        result = Int8Result(scores["fp32"], scores["int8"], n_val, len(calibration),
                            kept=scores["fp32"] - scores["int8"] <= max_loss)
        if result.kept:
            proto = onnx.load(str(quantized))
            for prop in props:
                proto.metadata_props.add(key=prop[0], value=prop[1])
            proto.metadata_props.add(key=INT8_KEY, value=json.dumps(
                {"split": split, "calibration_images": len(calibration), "val_srcc_fp32": result.val_srcc_fp32,
                 "val_srcc_int8": result.val_srcc_int8, "max_loss": max_loss}))
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp_out = out.with_name(out.name + ".tmp")
            onnx.save(proto, str(tmp_out))
            os.replace(tmp_out, out)
    return result


def _metadata(file: Path) -> list[tuple[str, str]]:
    """An ONNX file's metadata properties, in order."""
    import onnx

    return [(p.key, p.value) for p in onnx.load(str(file), load_external_data=False).metadata_props]
