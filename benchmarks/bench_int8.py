"""int8 against fp32 on a split's validation and test parts: the ONNX export and its static int8 form
(qfm.quantize, calibrated on 64 of the split's train images, as `qfm export --int8` does), scored by
onnxruntime on the same crops. The validation figures are what the export's gate decides on; the test
figures are reported only.

    python benchmarks/bench_int8.py --checkpoint T/best.safetensors --manifest M --split split_0
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from qfm.data.torch_dataset import CropConfig
from qfm.export import CROP_KEY, export_model
from qfm.quantize import calibration_images, part_srcc, quantize_file
from qfm.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="split_0")
    parser.add_argument("--calibration-images", type=int, default=64)
    args = parser.parse_args()
    resolve_device("cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    meta = export_model(args.checkpoint, "onnx", work / "fp32.onnx")
    crop = CropConfig(**json.loads(meta[CROP_KEY]))
    quantize_file(work / "fp32.onnx", work / "int8.onnx",
                  calibration_images(args.manifest, args.split, crop, args.calibration_images))
    for part in ("val", "test"):
        (fp32, n), (int8, _) = (part_srcc(work / f"{name}.onnx", args.manifest, args.split, part)
                                for name in ("fp32", "int8"))
        print(f"{part}: {n} images, SRCC fp32 {fp32:.4f}, int8 {int8:.4f}, loss {fp32 - int8:+.4f}")

if __name__ == "__main__":
    main()
