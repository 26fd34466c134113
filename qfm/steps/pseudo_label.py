"""pseudo-label (DLE): the frozen teacher scores the unlabelled pool; confident predictions are kept.

No val or test image may reach the student through its pseudo-labels: a pool image is left out (not
scored, not kept, counted in the summary) when its content_id is held-out content, when it is the same
file as a labelled image of the dataset (resolved path), or when its bytes are (SHA-256). A pool image
that is a labelled train image is left out too: it has its human score already.

``pseudo_labels.parquet`` paths are relative: to the dataset root (``path_root`` 'dataset': a pool
folder or CSV under the root) or to the pseudo-label folder itself ('pseudo': the synthetic pool it
wrote), so the table stays valid when the folders move (``dvc pull`` elsewhere).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qfm.config import PseudoLabelParams, RunParams
from qfm.data.distortions import DISTORTIONS, POOL_DISTORTIONS
from qfm.data.images import list_images
from qfm.data.manifest import Manifest
from qfm.data.torch_dataset import CropConfig, ImageListDataset
from qfm.errors import ConfigError, DataError
from qfm.inference import recording_errors
from qfm.runtime import loader_workers
from qfm.steps.common import manifest_for_split, setup, write_json
from qfm.tracking import tracked
from qfm.train.checkpoint import model_path
from qfm.train.distributed import from_main, gather_dict, gather_rows, is_main, sharded_loader
from qfm.train.engine import predict
from qfm.train.fit import load_trained_model

TABLE = "pseudo_labels.parquet"
COLUMNS = ["image_id", "path", "path_root", "content_id", "score", "uncertainty", "kept", "error"]
DATASET_ROOT, PSEUDO_ROOT = "dataset", "pseudo"


def read_pool(manifest: Manifest, pool: str) -> pd.DataFrame:
    """The pool as (image_id, path, content_id): a CSV with an 'image' column or a folder, under the root."""
    source = manifest.root / pool
    if source.is_dir():
        paths = list_images(source)
        rel = [str(Path(pool) / p.relative_to(source)) for p in paths]
        frame = pd.DataFrame({"image_id": rel, "path": rel, "path_root": DATASET_ROOT, "content_id": rel})
    elif source.is_file():
        table = pd.read_csv(source)
        if "image" not in table.columns:
            raise DataError(f"pool file {source}: needs an 'image' column (paths relative to {source.parent}); "
                            f"found {list(table.columns)}")
        base = Path(pool).parent
        rel = [str(base / str(p)) for p in table["image"]]
        content = table["content_id"].astype(str) if "content_id" in table.columns else pd.Series(rel)
        frame = pd.DataFrame({"image_id": rel, "path": rel, "path_root": DATASET_ROOT, "content_id": list(content)})
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
    written under out_dir/pool/ (paths relative to out_dir); each keeps its source's content_id, so it is
    never held-out content."""
    from PIL import Image

    from qfm.data.images import load_rgb

    kinds = list(DISTORTIONS.values()) + list(POOL_DISTORTIONS.values())
    train = manifest.frame[manifest.frame[split] == "train"]
    folder = out_dir / "pool"
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
            rows.append({"image_id": f"pool/{target.name}", "path": f"pool/{target.name}", "path_root": PSEUDO_ROOT,
                         "content_id": str(content)})
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
        return _write_empty(out_dir, run, params, excluded={})
    if params.pool == SYNTHETIC:  # written once, by rank 0 under torchrun
        pool = from_main(make_synthetic_pool(manifest, run.split, out_dir, params.synthetic_per_image,
                                             progress=progress) if is_main() else None)
    else:
        pool = read_pool(manifest, params.pool)
    files = resolve_paths(pool, manifest.root, out_dir)
    reason = exclusion_reasons(manifest, run.split, pool["content_id"].astype(str), files,
                               hash_files=params.pool != SYNTHETIC)
    excluded = {r: int((reason == r).sum()) for r in EXCLUSIONS}
    pool, files = pool[reason == ""].reset_index(drop=True), [f for f, r in zip(files, reason) if r == ""]
    if pool.empty:
        warnings.warn(f"pseudo-label: every image of the pool '{params.pool}' was left out ({excluded}); "
                      "the student gets no pseudo-labels", stacklevel=2)
        return _write_empty(out_dir, run, params, excluded)
    device = setup(run)
    teacher, state = load_trained_model(model_path(teacher_dir), device)
    crops = CropConfig(**state["crop"])
    dataset = ImageListDataset(files, crops, train=False, on_error="report")
    errors: dict[int, str] = {}
    loader = sharded_loader(dataset, params.batch_size, loader_workers(params.workers, device))
    index, score, spread = gather_rows(*predict(teacher, recording_errors(loader, errors), device,
                                                progress=progress and is_main(), desc="pseudo-label"))
    errors = gather_dict(errors)
    bad = sorted(errors)
    if bad and not params.skip_unreadable:
        listed = "\n".join(f"  - {files[i]}: {errors[i]}" for i in bad[:20])
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
    if is_main():  # under torchrun rank 0 writes; the other ranks return the same summary
        out_dir.mkdir(parents=True, exist_ok=True)
        pool[COLUMNS].to_parquet(out_dir / TABLE, index=False)
    return write_summary(out_dir, pool, run, params, excluded=excluded)


def _write_empty(out_dir: Path, run: RunParams, params: PseudoLabelParams, excluded: dict[str, int]) -> dict:
    types = [str, str, str, str, float, float, bool, str]
    table = pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(COLUMNS, types)})
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out_dir / TABLE, index=False)
    return write_summary(out_dir, table, run, params, excluded=excluded)


#: Why a pool image is left out: held-out content (content_id), the same file as a held-out image (resolved
#: path) or the same bytes (SHA-256), or a labelled train image (which has a human score already).
EXCLUSIONS = ("heldout_content", "heldout_file", "heldout_bytes", "labelled_train_image")


def resolve_paths(pool: pd.DataFrame, dataset_root: Path, pseudo_dir: Path) -> list[Path]:
    """The pool's files: each path joined to the root its ``path_root`` names."""
    roots = {DATASET_ROOT: Path(dataset_root), PSEUDO_ROOT: Path(pseudo_dir)}
    return [roots[r] / p for p, r in zip(pool["path"], pool["path_root"])]


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # unreadable: reported when decoded


def exclusion_reasons(manifest: Manifest, split: str, content_ids: pd.Series, files: list[Path], *,
                      hash_files: bool = True) -> np.ndarray:
    """Per pool image, why it must not be pseudo-labelled (one of EXCLUSIONS) or '' when it may be."""
    frame = manifest.frame
    held = (frame[split] != "train").to_numpy()
    labelled = [manifest.image_path(str(p)).resolve() for p in frame["path"]]
    held_files = {f for f, h in zip(labelled, held) if h}
    train_files = {f for f, h in zip(labelled, held) if not h}
    held_content = set(frame.loc[held, "content_id"].astype(str))
    held_bytes = {_sha256(f) for f in held_files} - {None} if hash_files else set()
    train_bytes = {_sha256(f) for f in train_files} - {None} if hash_files else set()
    reasons = np.full(len(files), "", dtype=object)
    for i, (content, path) in enumerate(zip(content_ids, files)):
        resolved = path.resolve()
        digest = _sha256(resolved) if hash_files else None
        if content in held_content:
            reasons[i] = "heldout_content"
        elif resolved in held_files:
            reasons[i] = "heldout_file"
        elif digest is not None and digest in held_bytes:
            reasons[i] = "heldout_bytes"
        elif resolved in train_files or digest is not None and digest in train_bytes:
            reasons[i] = "labelled_train_image"
    return reasons


def write_summary(out_dir: Path, table: pd.DataFrame, run: RunParams, params: PseudoLabelParams,
                  excluded: dict[str, int]) -> dict:
    kept = table[table["kept"].astype(bool)] if len(table) else table
    summary = {
        "split": run.split, "pool": params.pool, "n_pool": len(table),
        "n_excluded_heldout_content": sum(v for k, v in excluded.items() if k.startswith("heldout")),
        "n_excluded": {k: excluded.get(k, 0) for k in EXCLUSIONS},
        "n_unreadable": int(table["error"].notna().sum()) if len(table) else 0,
        "unreadable": [{"path": p, "error": e} for p, e in zip(table["path"], table["error"]) if e] if len(table) else [],
        "n_kept": len(kept), "keep_quantile": params.keep_quantile, "max_uncertainty": params.max_uncertainty,
        "kept_score_mean": float(kept["score"].mean()) if len(kept) else None,
        "kept_uncertainty_max": float(kept["uncertainty"].max()) if len(kept) else None,
    }
    if is_main():
        write_json(out_dir / "summary.json", summary)
    return summary


def read_pseudo_labels(pseudo_dir: str | Path | None) -> pd.DataFrame:
    """The kept pseudo-labels of a pseudo-label step's folder (empty when no folder is given), with `path` as
    a manifest row holds it: relative to the dataset root, or absolute for images of the pseudo-label folder."""
    if pseudo_dir is None:
        return pd.DataFrame(columns=COLUMNS)
    path = Path(pseudo_dir) / TABLE
    if not path.is_file():
        raise DataError(f"no pseudo-label table at {path}: run `qfm pseudo-label` first")
    table = pd.read_parquet(path)
    if "path_root" not in table.columns:
        raise DataError(f"pseudo-label table {path} has no path_root column (written by an older qfm); "
                        "run `qfm pseudo-label` again")
    table = table[table["kept"]].reset_index(drop=True)
    own = Path(pseudo_dir).resolve()
    return table.assign(path=[str(own / p) if r == PSEUDO_ROOT else p for p, r in zip(table["path"], table["path_root"])])
