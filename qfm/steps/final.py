"""train-final: the model one ships, trained by the chosen recipe on all of a dataset's labelled images.

A split's model learns from its train part only (70-80% of the data) so that its test part can measure the
recipe. The final model comes after that measurement: every labelled image trains it, except a small
validation part carved out (content-disjoint, seeded) only to choose the epoch, as on a split. No test part
exists, so an all-data model has validation figures only; its recipe's test figures are the study's.

The carved split is the manifest column ``final`` ('train' / 'val'), written with the rest of the manifest
into OUT/data; every step of the chain reads it as its split (run.split = 'final'), so the chain is the one
of a split run: a plain fine-tune when every QFM part of train_student is off (the recipe trains straight
into OUT), else the teacher (OUT/teacher), DLE (OUT/pseudo) and SNM (OUT/bank) where the student uses
them, then the student into OUT. OUT then holds the usual training files (best.safetensors, last.safetensors,
history.json, summary.json), its ONNX export model.onnx and final.json (what was trained on, how, the
score scale of the data). `qfm promote --model OUT --manifest OUT/data --split final` gates it as any model:
on its validation figures.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from qfm.config import RunParams, StudentParams, TrainParams
from qfm.data.manifest import Manifest, read_manifest, write_manifest
from qfm.data.splits import TRAIN, VAL
from qfm.errors import ConfigError, DataError
from qfm.steps.common import write_json
from qfm.tracking import TRAINING_OUTPUTS, tracked

FINAL_SPLIT = "final"      # the manifest column of the carved split: 'train' / 'val', no test part
DATA_DIR = "data"          # OUT/data/manifest.parquet: the manifest with the final column
FINAL_FILE = "final.json"  # OUT/final.json: the record of the final model
DEFAULT_VAL_FRACTION = 0.1


def carve_final_split(manifest: Manifest, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 2024,
                      group_by: str = "content_id") -> Manifest:
    """The manifest with column FINAL_SPLIT: 'val' for a seeded val_fraction of the distinct content (every
    image of a content id in the same part), 'train' for all the rest; nothing is held out for test."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction must be a number in (0, 1) (the share of content kept to choose the "
                          f"epoch), got {val_fraction!r}")
    frame = manifest.frame
    if frame.empty:
        raise DataError("the manifest has no labelled images: nothing to train a final model on")
    content = frame[group_by].astype(str)
    groups = np.array(sorted(content.unique()))
    if len(groups) < 2:
        raise DataError(f"a final model needs at least 2 distinct {group_by} values (one to train on, one to "
                        f"choose the epoch on); the manifest has {len(groups)}")
    n_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1)
    order = np.random.default_rng([seed, 0x46494E]).permutation(len(groups))  # 'FIN': not a split_i draw
    val = set(groups[order[:n_val]])
    frame = frame.assign(**{FINAL_SPLIT: np.where(content.isin(val), VAL, TRAIN)})
    frame[FINAL_SPLIT] = frame[FINAL_SPLIT].astype("string")
    meta = manifest.meta | {"final_split": {"column": FINAL_SPLIT, "val_fraction": val_fraction, "seed": seed,
                                            "group_by": group_by, "n_val_content": n_val,
                                            "n_train": int((frame[FINAL_SPLIT] == TRAIN).sum()),
                                            "n_val": int((frame[FINAL_SPLIT] == VAL).sum())}}
    return Manifest(frame=frame, root=manifest.root, meta=meta)


def source_commit() -> str:
    """The git commit of the qfm source in use (with '-dirty' when the package's code has uncommitted
    changes; the packaged model folder does not count), or 'unknown' outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)pretrained"],  # the packaged model it may be rebuilding
                               cwd=here.parent, capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty.strip() else "")


def train_final(manifest_dir: str | Path, out_dir: str | Path, params: dict, *,
                val_fraction: float | None = None, seed: int | None = None, resume: bool = False,
                export: bool = True, progress: bool = True, on_epoch=None) -> dict:
    """Train the recipe of `params` (validated params.yaml sections, qfm.config.load_params) on all of the
    manifest's images but a carved validation part (see the module docstring); returns final.json's content.
    val_fraction, seed: the carve's (default: the final section's). export: also write OUT/model.onnx."""
    from qfm.steps.study import is_plain, recipe_of

    out_dir = Path(out_dir)
    val_fraction = params["final"].val_fraction if val_fraction is None else val_fraction
    seed = params["final"].seed if seed is None else seed
    source = read_manifest(manifest_dir)
    manifest = carve_final_split(source, val_fraction, seed)
    data_dir = out_dir / DATA_DIR
    write_manifest(manifest, data_dir)
    run = replace(params["run"], split=FINAL_SPLIT)
    student = params["train_student"]
    if is_plain(student):
        chain, trained = "plain fine-tune (every QFM part of train_student off)", recipe_of(student)
    else:
        chain, trained = "QFM student (teacher, then DLE/SNM where used, then the student)", student
    summary = fit_final(data_dir, out_dir, trained, run, sections=params, resume=resume, progress=progress,
                        on_epoch=on_epoch, tracking=params.get("tracking"))
    if export:
        from qfm.export import export_model
        from qfm.onnx_engine import ONNX_FILE

        export_model(out_dir, "onnx", out_dir / ONNX_FILE)
    record = {
        "model": "final: all labelled images but a carved validation part",
        "dataset": source.meta.get("dataset", "unknown"),
        "n_images": len(manifest.frame),
        "n_train": manifest.meta["final_split"]["n_train"],
        "n_val": manifest.meta["final_split"]["n_val"],
        "val_fraction": val_fraction,
        "split_seed": seed,
        "split_column": FINAL_SPLIT,
        "scale": source.meta.get("scale", {}),
        "chain": chain,
        "recipe": asdict(trained),
        "params": {name: asdict(section) for name, section in params.items() if name != "tracking"},
        "best_epoch": summary["best_epoch"],
        "selected_on": summary["selected_on"],
        "val": summary["val"],
        "torch_threads": _torch_threads(),
        "commit": source_commit(),
    }
    write_json(out_dir / FINAL_FILE, record)
    return record


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@tracked("train_final", inputs=("manifest_dir",), outputs=TRAINING_OUTPUTS, checkpoints=("best.safetensors",))
def fit_final(manifest_dir: str | Path, out_dir: str | Path, params: TrainParams, run: RunParams, *,
              sections: dict, resume: bool = False, progress: bool = True, on_epoch=None) -> dict:
    """The training chain on the final split (one MLflow run, step train_final): params is the recipe of a
    plain fine-tune, trained straight into out_dir, or the student's section, trained after its teacher
    (out_dir/teacher), DLE pool (out_dir/pseudo) and SNM bank (out_dir/bank) where it uses them."""
    from qfm.steps.bank import build_bank
    from qfm.steps.pseudo_label import pseudo_label
    from qfm.steps.student import train_student, uses_pseudo_labels, uses_qcc
    from qfm.steps.teacher import train_teacher

    out_dir = Path(out_dir)
    if not isinstance(params, StudentParams):
        return train_teacher(manifest_dir, out_dir, params, run, resume=resume, progress=progress,
                             on_epoch=on_epoch)
    pool, bank = sections["pseudo_label"], sections["build_bank"]
    teacher_dir = out_dir / "teacher"
    train_teacher(manifest_dir, teacher_dir, sections["train_teacher"], run, resume=resume, progress=progress)
    pseudo_dir = bank_dir = None
    if pool.pool and (uses_pseudo_labels(params) or uses_qcc(params) and bank.include_pseudo):
        pseudo_dir = out_dir / "pseudo"
        pseudo_label(manifest_dir, teacher_dir, pseudo_dir, pool, run, progress=progress)
    if uses_qcc(params):
        bank_dir = out_dir / "bank"
        build_bank(manifest_dir, teacher_dir, pseudo_dir if bank.include_pseudo else None, bank_dir, bank, run,
                   progress=progress)
    return train_student(manifest_dir, out_dir, params, run, teacher_dir=teacher_dir,
                         pseudo_dir=pseudo_dir if uses_pseudo_labels(params) else None, bank_dir=bank_dir,
                         resume=resume, progress=progress, on_epoch=on_epoch)


def read_final(model_dir: str | Path) -> dict:
    """OUT/final.json of a final model folder; a DataError naming what to run when it is missing."""
    path = Path(model_dir) / FINAL_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist: {model_dir} is not a final model folder; train one with "
                        "`qfm train-final --manifest M --out FOLDER`")
    return json.loads(path.read_text())
