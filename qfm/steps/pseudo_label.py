"""pseudo-label (DLE): the frozen teacher scores the unlabelled pool; confident predictions are kept.

Pool images whose content_id lies in the split's val or test part are left out (not scored, not kept),
so no test content reaches the student through its pseudo-labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qfm.config import PseudoLabelParams, RunParams
from qfm.data.images import list_images
from qfm.data.manifest import Manifest
from qfm.data.torch_dataset import CropConfig, ImageListDataset, make_loader
from qfm.errors import ConfigError, DataError
from qfm.steps.common import manifest_for_split, model_path, recording_errors, write_json
from qfm.tracking import tracked
from qfm.train.engine import predict, resolve_device
from qfm.train.fit import load_trained_model

TABLE = "pseudo_labels.parquet"
COLUMNS = ["image_id", "path", "content_id", "score", "uncertainty", "kept", "error"]


def read_pool(manifest: Manifest, pool: str) -> pd.DataFrame:
    """The pool as (image_id, path, content_id): a CSV with an 'image' column or a folder, under the root."""
    source = manifest.root / pool
    if source.is_dir():
        paths = list_images(source)
        rel = [str(Path(pool) / p.relative_to(source)) for p in paths]
        frame = pd.DataFrame({"image_id": rel, "path": rel, "content_id": rel})
    elif source.is_file():
        table = pd.read_csv(source)
        if "image" not in table.columns:
            raise DataError(f"pool file {source}: needs an 'image' column (paths relative to {source.parent}); "
                            f"found {list(table.columns)}")
        base = Path(pool).parent
        rel = [str(base / str(p)) for p in table["image"]]
        content = table["content_id"].astype(str) if "content_id" in table.columns else pd.Series(rel)
        frame = pd.DataFrame({"image_id": rel, "path": rel, "content_id": list(content)})
    else:
        raise DataError(f"unlabelled pool {source} does not exist: set pseudo_label.pool to a CSV or a folder "
                        "under the dataset root, or to \"\" to run without DLE")
    if frame.empty:
        raise DataError(f"unlabelled pool {source} holds no images")
    return frame


SYNTHETIC = "synthetic"


def make_synthetic_pool(manifest: Manifest, split: str, out_dir: Path, per_image: int, seed: int = 0,
                        progress: bool = True) -> pd.DataFrame:
    """Distorted copies of the split's train images (random type and level from the demo's distortions),
    written under out_dir/pool/; each keeps its source's content_id, so it is never held-out content."""
    from PIL import Image

    from qfm.data.demo import DISTORTIONS, POOL_DISTORTIONS
    from qfm.data.images import load_rgb

    kinds = list(DISTORTIONS.values()) + list(POOL_DISTORTIONS.values())
    train = manifest.frame[manifest.frame[split] == "train"]
    folder = (out_dir / "pool").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, (image_id, path, content) in enumerate(tqdm(
            zip(train["image_id"], train["path"], train["content_id"]), total=len(train), desc="synthetic pool",
            disable=not progress)):
        pixels = np.asarray(load_rgb(manifest.root / path))
        rng = np.random.default_rng([seed, n])
        for copy in range(per_image):
            kind = kinds[rng.integers(len(kinds))]
            level = float(rng.choice(kind.strengths(4)))
            target = folder / f"{Path(str(image_id)).stem}_{n}_{copy}_{kind.name}.png"
            Image.fromarray(kind.apply(pixels, level, rng)).save(target)
            rows.append({"image_id": f"pool/{target.name}", "path": str(target), "content_id": str(content)})
    return pd.DataFrame(rows)


def select_confident(uncertainty: np.ndarray, keep_quantile: float, max_uncertainty: float | None) -> np.ndarray:
    """Keep the keep_quantile share with the lowest crop spread, and only those under max_uncertainty."""
    if not 0.0 <= keep_quantile <= 1.0:
        raise ConfigError(f"pseudo_label.keep_quantile must be in [0, 1], got {keep_quantile}")
    keep = np.zeros(len(uncertainty), dtype=bool)
    n_keep = round(keep_quantile * len(uncertainty))
    keep[np.argsort(uncertainty, kind="stable")[:n_keep]] = True
    if max_uncertainty is not None:
        keep &= uncertainty <= max_uncertainty
    return keep


@tracked("pseudo_label", inputs=("manifest_dir", "teacher_dir"), outputs=("summary.json",))
def pseudo_label(manifest_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path,
                 params: PseudoLabelParams, run: RunParams, *, progress: bool = True) -> dict:
    """Score the pool with the teacher; write pseudo_labels.parquet (COLUMNS) and summary.json."""
    out_dir = Path(out_dir)
    manifest = manifest_for_split(manifest_dir, run.split)
    if not params.pool:
        table = pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(COLUMNS, [str, str, str, float, float, bool, str])})
        out_dir.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out_dir / TABLE, index=False)
        return write_summary(out_dir, table, run, params, excluded=0)
    if params.pool == SYNTHETIC:
        pool = make_synthetic_pool(manifest, run.split, out_dir, params.synthetic_per_image, progress=progress)
    else:
        pool = read_pool(manifest, params.pool)
    held_out = set(manifest.frame.loc[manifest.frame[run.split] != "train", "content_id"].astype(str))
    excluded = pool["content_id"].isin(held_out)
    pool = pool[~excluded].reset_index(drop=True)
    device = resolve_device(run.device)
    teacher, state = load_trained_model(model_path(teacher_dir), device)
    crops = CropConfig(**state["crop"])
    dataset = ImageListDataset([manifest.root / p for p in pool["path"]], crops, train=False, on_error="report")
    errors: dict[int, str] = {}
    loader = make_loader(dataset, params.batch_size, params.workers)
    index, score, spread = predict(teacher, recording_errors(loader, errors), device, progress=progress, desc="pseudo-label")
    bad = sorted(errors)
    if bad and not params.skip_unreadable:
        listed = "\n".join(f"  - {manifest.root / pool['path'][i]}: {errors[i]}" for i in bad[:20])
        raise DataError(f"{len(bad)} pool image(s) cannot be read:\n{listed}\n"
                        "Remove or fix them, or set pseudo_label.skip_unreadable: true to list them and go on")
    pool["score"] = np.nan
    pool["uncertainty"] = np.nan
    pool.loc[index, "score"] = score
    pool.loc[index, "uncertainty"] = spread
    pool["error"] = [errors.get(i) for i in range(len(pool))]
    readable = pool["error"].isna().to_numpy()
    kept = np.zeros(len(pool), dtype=bool)
    kept[readable] = select_confident(pool.loc[readable, "uncertainty"].to_numpy(), params.keep_quantile,
                                      params.max_uncertainty)
    pool["kept"] = kept
    pool["score"] = pool["score"].clip(0.0, 1.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool[COLUMNS].to_parquet(out_dir / TABLE, index=False)
    return write_summary(out_dir, pool, run, params, excluded=int(excluded.sum()))


def write_summary(out_dir: Path, table: pd.DataFrame, run: RunParams, params: PseudoLabelParams,
                  excluded: int) -> dict:
    kept = table[table["kept"].astype(bool)] if len(table) else table
    summary = {
        "split": run.split, "pool": params.pool, "n_pool": len(table),
        "n_excluded_heldout_content": excluded, "n_unreadable": int(table["error"].notna().sum()) if len(table) else 0,
        "unreadable": [{"path": p, "error": e} for p, e in zip(table["path"], table["error"]) if e] if len(table) else [],
        "n_kept": len(kept), "keep_quantile": params.keep_quantile, "max_uncertainty": params.max_uncertainty,
        "kept_score_mean": float(kept["score"].mean()) if len(kept) else None,
        "kept_uncertainty_max": float(kept["uncertainty"].max()) if len(kept) else None,
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def read_pseudo_labels(pseudo_dir: str | Path | None) -> pd.DataFrame:
    """The kept pseudo-labels of a pseudo-label step's folder (empty when no folder is given)."""
    if pseudo_dir is None:
        return pd.DataFrame(columns=COLUMNS)
    path = Path(pseudo_dir) / TABLE
    if not path.is_file():
        raise DataError(f"no pseudo-label table at {path}: run `qfm pseudo-label` first")
    table = pd.read_parquet(path)
    return table[table["kept"]].reset_index(drop=True)
