"""The normalised manifest: one Parquet table per dataset, built from an adapter's raw table.

Columns (one row per scored image):
  image_id (str, unique), path (str, relative to the dataset root), mos (float in [0, 1], higher = better),
  mos_raw (float, as published), mos_std (float, NaN where not published), content_id (str: the reference
  image for synthetic datasets, the image itself for authentic ones), distortion_type (str or null),
  distortion_level (float or NaN), dataset (str), split_0 … split_{n-1} ('train' / 'val' / 'test'), and
  official_split where the release publishes one.
The Parquet schema metadata key ``qfm`` holds the score scale, the split protocol, the dataset root
(relative to the manifest's folder when it can be) and what was skipped, if the user opted in to skipping.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from qfm.data.images import check_image
from qfm.data.splits import SplitProtocol, make_splits
from qfm.errors import DataError

MANIFEST_FILE = "manifest.parquet"
REPORT_FILE = "ingest_report.json"
METADATA_KEY = b"qfm"
BASE_COLUMNS = ["image_id", "path", "mos", "mos_raw", "mos_std", "content_id",
                "distortion_type", "distortion_level", "dataset"]
RAW_REQUIRED = ["image_id", "path", "mos_raw", "source"]
RAW_OPTIONAL = {"mos_std": np.nan, "content_id": None, "distortion_type": None, "distortion_level": np.nan}


@dataclass(frozen=True)
class ScoreScale:
    """The published score range and direction; maps raw scores onto [0, 1], higher = better."""

    lo: float
    hi: float
    higher_is_better: bool = True
    kind: str = "MOS"

    def __post_init__(self) -> None:
        if not self.hi > self.lo:
            raise DataError(f"score range [{self.lo}, {self.hi}] is empty: hi must be greater than lo")

    def to_unit(self, raw: np.ndarray | pd.Series) -> np.ndarray:
        unit = (np.asarray(raw, dtype=float) - self.lo) / (self.hi - self.lo)
        return unit if self.higher_is_better else 1.0 - unit


@dataclass
class RawDataset:
    """What an adapter returns: the scores as published, before checks and normalisation.

    ``table`` has RAW_REQUIRED columns (``source`` names where the row came from, e.g. 'dmos.csv line 7')
    and any of RAW_OPTIONAL. ``synthetic`` datasets must give content_id (the reference image).
    """

    dataset: str
    root: Path
    scale: ScoreScale
    table: pd.DataFrame
    synthetic: bool = False
    notes: dict = field(default_factory=dict)


@dataclass
class Manifest:
    """A built manifest and where its images live."""

    frame: pd.DataFrame
    root: Path
    meta: dict

    @property
    def split_columns(self) -> list[str]:
        return [c for c in self.frame.columns if c.startswith("split_")]

    def image_path(self, row_path: str) -> Path:
        return self.root / row_path


def _fail_or_skip(problems: list[dict], skip_invalid: bool, what: str) -> None:
    if problems and not skip_invalid:
        lines = [f"  - {p['source']}: {p['path']}: {p['reason']}" for p in problems[:20]]
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{len(problems)} {what}:\n" + "\n".join(lines) + more
            + "\nFix the data, or opt in to leaving these rows out (`qfm ingest --skip-invalid`, "
              "ingest.skip_invalid: true, or skip_invalid=True); they are then listed in the report."
        )


def _problem(row: pd.Series, reason: str) -> dict:
    return {"image_id": str(row["image_id"]), "path": str(row["path"]), "source": str(row["source"]),
            "reason": reason}


def check_scores(table: pd.DataFrame, scale: ScoreScale, skip_invalid: bool) -> tuple[pd.DataFrame, list[dict]]:
    """Reject (or with skip_invalid, set aside) duplicate ids, empty/NaN scores and out-of-range scores."""
    skipped: list[dict] = []
    dup = table["image_id"].duplicated(keep=False)
    if dup.any():
        problems = [_problem(r, "duplicate image name (listed more than once in the score file)")
                    for _, r in table[dup].iterrows()]
        _fail_or_skip(problems, skip_invalid, "duplicate image names")
        skipped += problems
        table = table[~dup]
    raw = pd.to_numeric(table["mos_raw"], errors="coerce")
    bad = raw.isna()
    if bad.any():
        problems = [_problem(r, f"score is empty or not a number ({r['mos_raw']!r})") for _, r in table[bad].iterrows()]
        _fail_or_skip(problems, skip_invalid, "rows with an empty or NaN score")
        skipped += problems
        table, raw = table[~bad], raw[~bad]
    out = (raw < scale.lo) | (raw > scale.hi)
    if out.any():
        problems = [_problem(r, f"score {float(v)} is outside the declared range [{scale.lo}, {scale.hi}]")
                    for (_, r), v in zip(table[out].iterrows(), raw[out])]
        _fail_or_skip(problems, skip_invalid, "scores outside the declared range")
        skipped += problems
        table, raw = table[~out], raw[~out]
    return table.assign(mos_raw=raw.astype(float)), skipped


def check_files(table: pd.DataFrame, root: Path, skip_invalid: bool, workers: int = 4,
                progress: bool = True) -> tuple[pd.DataFrame, list[dict], list[tuple[int, int]]]:
    """Decode every image once; missing, truncated, corrupt or non-image files fail (or are set aside)."""
    paths = [root / p for p in table["path"]]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(check_image, paths), total=len(paths), desc="checking images",
                            unit="img", disable=not progress))
    ok = np.array([isinstance(r, tuple) for r in results], dtype=bool)
    problems = [_problem(r, reason) for (_, r), reason, good in zip(table.iterrows(), results, ok) if not good]
    _fail_or_skip(problems, skip_invalid, "image files that are missing or cannot be decoded")
    sizes = [r for r in results if isinstance(r, tuple)]
    return table[ok], problems, sizes


def build_manifest(raw: RawDataset, protocol: SplitProtocol | None = None, skip_invalid: bool = False,
                   check_images: bool = True, progress: bool = True) -> Manifest:
    """Check an adapter's raw table, normalise scores to [0, 1] and add the split columns."""
    protocol = protocol or SplitProtocol()
    table = raw.table.copy()
    missing = [c for c in RAW_REQUIRED if c not in table.columns]
    if missing:
        raise DataError(f"adapter for '{raw.dataset}' returned no column(s) {missing}: this is a bug in qfm")
    if table.empty:
        raise DataError(f"dataset '{raw.dataset}' at {raw.root} has no scored images: nothing to ingest")
    for column, default in RAW_OPTIONAL.items():
        if column not in table.columns:
            table[column] = default
    if raw.synthetic and table["content_id"].isna().any():
        raise DataError(f"adapter for synthetic dataset '{raw.dataset}' gave rows without content_id: a qfm bug")
    table["image_id"] = table["image_id"].astype(str)
    table["path"] = table["path"].astype(str).str.replace(os.sep, "/")
    n_listed = len(table)
    table, skipped = check_scores(table, raw.scale, skip_invalid)
    sizes: list[tuple[int, int]] = []
    if check_images:
        table, bad_files, sizes = check_files(table, raw.root, skip_invalid, progress=progress)
        skipped += bad_files
    if table.empty:
        raise DataError(f"dataset '{raw.dataset}': every one of its {n_listed} rows was invalid; nothing to ingest")
    table = table.reset_index(drop=True)
    table["content_id"] = table["content_id"].where(table["content_id"].notna(), table["image_id"]).astype(str)
    frame = pd.DataFrame({
        "image_id": table["image_id"].astype("string"),
        "path": table["path"].astype("string"),
        "mos": raw.scale.to_unit(table["mos_raw"]),
        "mos_raw": table["mos_raw"].astype(float),
        "mos_std": pd.to_numeric(table["mos_std"], errors="coerce").astype(float),
        "content_id": table["content_id"].astype("string"),
        "distortion_type": table["distortion_type"].astype("string"),
        "distortion_level": pd.to_numeric(table["distortion_level"], errors="coerce").astype(float),
        "dataset": pd.Series([raw.dataset] * len(table), dtype="string"),
    })
    if "official_split" in table.columns:  # a split published with the release (e.g. KonIQ's sets file)
        frame["official_split"] = table["official_split"].astype("string")
    frame = pd.concat([frame, make_splits(frame["content_id"], protocol).astype("string")], axis=1)
    meta = {
        "dataset": raw.dataset,
        "synthetic": raw.synthetic,
        "scale": asdict(raw.scale),
        "splits": protocol.as_dict(),
        "n_listed": n_listed,
        "n_images": len(frame),
        "skipped": skipped,
        "n_skipped": len(skipped),
        "image_size": _size_summary(sizes),
        "notes": raw.notes,
    }
    return Manifest(frame=frame, root=Path(raw.root), meta=meta)


def _size_summary(sizes: list[tuple[int, int]]) -> dict:
    if not sizes:
        return {}
    arr = np.array(sizes)
    return {"min_width": int(arr[:, 0].min()), "min_height": int(arr[:, 1].min()),
            "max_width": int(arr[:, 0].max()), "max_height": int(arr[:, 1].max())}


def write_manifest(manifest: Manifest, out_dir: str | Path) -> Path:
    """Write manifest.parquet (metadata in the schema) and ingest_report.json into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(manifest.root).resolve()
    try:
        stored_root = os.path.relpath(root, out_dir.resolve())
    except ValueError:  # another drive
        stored_root = str(root)
    meta = manifest.meta | {"root": stored_root}
    table = pa.Table.from_pandas(manifest.frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(meta).encode()})
    path = out_dir / MANIFEST_FILE
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    (out_dir / REPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read a manifest (a file or the folder holding manifest.parquet); root overrides the stored one."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.exists():
        raise DataError(f"manifest {path} does not exist: run `qfm ingest` (or `qfm demo-data`) first")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"manifest {path} is not a readable Parquet file ({exc}); re-run `qfm ingest`") from exc
    raw_meta = (table.schema.metadata or {}).get(METADATA_KEY)
    meta = json.loads(raw_meta) if raw_meta else {}
    if root is None:
        stored = meta.get("root")
        if stored is None:
            raise DataError(f"manifest {path} records no dataset root; pass the root explicitly")
        root = (path.parent / stored) if not os.path.isabs(stored) else Path(stored)
    return Manifest(frame=table.to_pandas(), root=Path(root), meta=meta)

