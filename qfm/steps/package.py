"""package: a final model folder (qfm train-final) as the packaged model qfm ships (qfm/pretrained/).

Writes model.safetensors (+ .sha256), model.onnx, pretrained.json and MODEL_CARD.md into one folder, at most
MAX_BYTES together. The card is generated from final.json (recipe, commit, validation figures, crop
settings) and from a Markdown file about the data (--card-notes: source, licence notice, citation), which
the card quotes unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from qfm.errors import DataError
from qfm.packaged import CARD_FILE, METADATA_FILE, ONNX_FILE, WEIGHTS_FILE, check_scale, scale_label
from qfm.steps.final import read_final

MAX_BYTES = 30_000_000
SOURCE_WEIGHTS = "best.safetensors"
SIDECAR = ".sha256"


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def package_model(model_dir: str | Path, out_dir: str | Path, *, card_notes: str | Path | None = None,
                  command: str | None = None, name: str = "qfm-iqm") -> list[Path]:
    """Write the packaged form of the final model in model_dir into out_dir; returns the files written."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    record = read_final(model_dir)
    scale = check_scale(record["scale"], str(model_dir / "final.json"))
    sources = {WEIGHTS_FILE: model_dir / SOURCE_WEIGHTS, ONNX_FILE: model_dir / ONNX_FILE}
    for target, source in sources.items():
        if not source.is_file():
            raise DataError(f"{source} does not exist: {model_dir} is not a finished final model; rerun "
                            f"`qfm train-final --out {model_dir}` (with --resume to keep its training)")
    size = sum(p.stat().st_size for p in sources.values())
    if size > MAX_BYTES:
        raise DataError(f"the model files of {model_dir} take {size / 1e6:.1f} MB, above the package's "
                        f"{MAX_BYTES / 1e6:.0f} MB: choose a smaller model")
    notes = Path(card_notes).read_text() if card_notes else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for target, source in sources.items():
        shutil.copyfile(source, out_dir / target)
        written.append(out_dir / target)
    digest = _sha256(out_dir / WEIGHTS_FILE)
    (out_dir / (WEIGHTS_FILE + SIDECAR)).write_text(digest + "\n")  # the checkpoint loader verifies it
    written.append(out_dir / (WEIGHTS_FILE + SIDECAR))
    crop = _crop_settings(out_dir / WEIGHTS_FILE)
    metadata = {
        "name": name,
        "dataset": record["dataset"],
        "n_images": record["n_images"], "n_train": record["n_train"], "n_val": record["n_val"],
        "val_fraction": record["val_fraction"], "split_seed": record["split_seed"],
        "scale": scale,
        "outputs": {"score": "the model's score in [0, 1], higher is better",
                    "mos": f"the score on the training set's scale: {scale_label(scale, record['dataset'])}"},
        "chain": record["chain"], "recipe": record["recipe"], "params": record["params"],
        "best_epoch": record["best_epoch"], "selected_on": record["selected_on"], "val": record["val"],
        "crop": crop, "torch_threads": record["torch_threads"], "commit": record["commit"],
        "command": command or "",
        "files": {p.name: {"sha256": _sha256(out_dir / p.name), "bytes": (out_dir / p.name).stat().st_size}
                  for p in (out_dir / WEIGHTS_FILE, out_dir / ONNX_FILE)},
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    (out_dir / CARD_FILE).write_text(model_card(metadata, notes))
    written += [out_dir / METADATA_FILE, out_dir / CARD_FILE]
    total = sum(p.stat().st_size for p in written)
    if total > MAX_BYTES:
        raise DataError(f"the packaged model in {out_dir} takes {total / 1e6:.1f} MB, above {MAX_BYTES / 1e6:.0f} MB")
    return written


def _crop_settings(weights: Path) -> dict:
    from qfm.train.checkpoint import load_checkpoint

    return dict(load_checkpoint(weights)["crop"])


def _figure(value) -> str:
    return "n/a" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.4f}"


def _mos_formula(scale: dict) -> str:
    span = scale["hi"] - scale["lo"]
    if scale["higher_is_better"]:
        return f"`mos = {scale['lo']:g} + score x {span:g}`"
    return f"`mos = {scale['hi']:g} - score x {span:g}` (lower is better on this scale)"


def model_card(meta: dict, notes: str) -> str:
    """The model card's Markdown from pretrained.json's content and the data notes."""
    recipe, val, crop, scale = meta["recipe"], meta["val"], meta["crop"], meta["scale"]
    label = scale_label(scale, meta["dataset"])
    grid = crop["test_grid"]
    grid_text = f"{grid[0]}x{grid[1]}" if isinstance(grid, (list, tuple)) else f"{grid}-crop"
    recipe_rows = "\n".join(f"| {key} | `{json.dumps(recipe[key])}` |" for key in
                            ("model", "model_options", "epochs", "batch_size", "n_crops", "crop_size", "test_grid",
                             "resize", "lr", "weight_decay", "warmup_epochs", "schedule", "clip_grad",
                             "select_metric", "seed", "amp") if key in recipe)
    files = "\n".join(f"| {name} | {info['bytes'] / 1e6:.1f} MB | `{info['sha256']}` |"
                      for name, info in meta["files"].items())
    command = meta["command"] or "(not recorded)"
    return f"""# Model card: {meta['name']}, the pretrained QFM-IQM model

A no-reference image quality model: one photo in, one quality score out, with no reference image. It ships
inside the `qfm` package (this folder), so it scores right after install, with no download and no training.

## Use

```
qfm score photo.jpg                      # CSV on standard output: path, score, mos, mos_scale, crop_std, error
qfm score photos/ --out scores.csv       # every image in a folder
qfm score photos/ --engine onnxruntime   # the ONNX export, numpy and onnxruntime only
```

```python
import qfm

model = qfm.load()                        # engine="torch" (default) or "onnxruntime"
model.score("photo.jpg")                  # 0-1, higher is better
model.mos("photo.jpg")                    # the same score on the training set's scale ({label})
model.score(pil_image)                    # a PIL image, or a numpy array (H, W, 3) uint8 RGB
model.score(["a.jpg", "b.jpg"])           # a list: an array of scores
model.table(["a.jpg", "b.jpg"])           # a pandas table: path, score, mos, mos_scale, crop_std
```

`qfm.create_metric()` is the same as `qfm.load()`.

## Outputs: two scales

- `score`: the model's own output, in [0, 1] (higher is better): the training scores mapped to [0, 1] by
  `qfm ingest` from the published range [{scale['lo']:g}, {scale['hi']:g}].
- `mos`: the same score on the training set's scale ({label}):
  {_mos_formula(scale)}. It reads like the database's mean opinion scores, but it is a prediction, and it
  is most meaningful for photos like the training photos (see "What it was not trained on").

Scores rank images (the model was chosen on Spearman's rank correlation); their absolute level is less
certain than their order.

## Data

{meta['n_images']} photos of the dataset `{meta['dataset']}`: {meta['n_train']} trained the model and
{meta['n_val']} (a seeded, content-disjoint {meta['val_fraction']:g} share, seed {meta['split_seed']}) were kept
out of training to choose the epoch. No test part was held out: this is the model one ships after the
recipe was measured on splits.

{notes.strip() or '(no notes about the data were given when this model was packaged)'}

## Recipe

{meta['chain']}; epoch {meta['best_epoch']} chosen by {meta['selected_on']}.

| parameter | value |
| --- | --- |
{recipe_rows}

Source commit: `{meta['commit']}`; torch threads: {meta['torch_threads']}.

## Validation figures

On the {meta['n_val']} validation photos, which chose the epoch (so they flatter the model a little); there are no
test figures for a model trained on all the data. The recipe's test figures on held-out splits come from
`qfm study` (benchmarks/results/ in the source repository), not from this model.

| metric | value |
| --- | --- |
| SRCC | {_figure(val.get('srcc'))} |
| KRCC | {_figure(val.get('krcc'))} |
| PLCC raw (on the raw predictions) | {_figure(val.get('plcc_raw'))} |
| PLCC logistic-fitted (after the 4-parameter logistic fit) | {_figure(val.get('plcc_logistic'))} |
| RMSE raw (on the [0, 1] scale) | {_figure(val.get('rmse_raw'))} |

## Preprocessing

The image is decoded to 8-bit RGB (EXIF orientation as the file's decoder gives it), kept at its own size
(resize: `{json.dumps(crop.get('resize'))}`), scaled up (bilinear) only if its shorter side is below
{crop['crop_size']} pixels, then cut into a fixed {grid_text} grid of {crop['crop_size']}x{crop['crop_size']} crops
spread from corner to corner; each crop is scored and the image's score is the mean over its crops
(`crop_std`: their spread). Pixels are normalised inside the model (mean {tuple(crop['mean'])}, std
{tuple(crop['std'])}). The ONNX export takes the uint8 crops (N, {crop['crop_size']}, {crop['crop_size']}, 3)
and returns one score per crop; `qfm score --engine onnxruntime` cuts and averages the same crops.

## What it was not trained on

- Big photos: the training photos are mostly 500x500 pixels. A 12-megapixel photo is not resized, so each
  {crop['crop_size']}-pixel crop sees a small patch of it; its score may not match what a viewer of the whole
  photo would say. Downscale such photos to about 500 pixels on the short side first if you want scores on the
  training photos' footing.
- Screenshots, graphics, text, renders, scans and video frames: only camera photos (phones and tablets).
- Synthetic distortions at controlled levels (JPEG, blur, noise as in LIVE, TID2013, KADID-10k): the
  training photos carry authentic, mixed capture distortions only.
- Aesthetics: raters judged quality, not beauty or content.

## Train your own

With your own labelled photos (a CSV of file names and scores, or a published database):

```
qfm ingest --format csv --root my_photos --out my_ingest --option score_min=1 --option score_max=5
qfm study --manifest my_ingest --out my_study      # measure recipes on splits, choose on validation
qfm train-final --manifest my_ingest --out my_final --params params.yaml
qfm score photos/ --model my_final                 # or --engine onnxruntime --model my_final
qfm train-final --manifest my_ingest --out my_final --resume --package my_package   # this folder's form
```

## Rebuild this model

```
{command}
```

The command ingests the data, trains with fixed seeds and a fixed number of torch threads
({meta['torch_threads']}), and packages the result; on the same machine, software and thread count it gives the
same weights (another CPU, library version or thread count may change the last bits, and so the epoch chosen).

## Files

| file | size | SHA-256 |
| --- | --- | --- |
{files}

`model.safetensors.sha256` holds the checkpoint's checksum (the loader refuses a file that does not match);
`{METADATA_FILE}` holds the data's score scale, the recipe, the crop settings and the figures above.
The code is Apache-2.0; the weights were learned from the database above, whose notice is quoted there.
"""
