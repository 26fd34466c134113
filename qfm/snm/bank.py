"""The feature bank on disk, and the one call that builds it.

Layout of a bank folder:
  index.faiss     the faiss index (faiss.write_index), row i = embeddings row i
  embeddings.npy  float32 (n, C), L2-normalised teacher embeddings
  bank.parquet    image_id, content_id, quality (in [0, 1]), is_pseudo, row (index row)
  pairs.parquet   anchor_id, partner_id, similarity, quality_gap (partner - anchor), rank, rule
  summary.json    the mining summary (see mining.summarize_pairs) plus a ``bank`` section
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qfm.errors import DataError
from qfm.snm.index import IndexInfo, build_index, check_embeddings
from qfm.snm.mining import PAIR_COLUMNS, mine_partners, summarize_pairs

INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
BANK_FILE = "bank.parquet"
PAIRS_FILE = "pairs.parquet"
SUMMARY_FILE = "summary.json"
META_COLUMNS = ["image_id", "content_id", "quality", "is_pseudo"]


@dataclass
class Bank:
    """A loaded bank: embeddings, one metadata row per embedding row, the index and the summary."""

    embeddings: np.ndarray
    meta: pd.DataFrame
    index: faiss.Index
    summary: dict


def _meta_table(meta_frame: pd.DataFrame, n: int) -> pd.DataFrame:
    missing = [c for c in META_COLUMNS if c not in meta_frame.columns]
    if missing:
        raise DataError(f"bank metadata lacks column(s) {missing}; found {list(meta_frame.columns)}")
    if len(meta_frame) != n:
        raise DataError(f"bank metadata has {len(meta_frame)} rows but there are {n} embeddings; "
                        "they must match row for row")
    if meta_frame["is_pseudo"].isna().any():
        raise DataError("bank metadata column is_pseudo has missing values; mark every row True or False")
    return pd.DataFrame({
        "image_id": meta_frame["image_id"].astype(str).astype("string").to_numpy(),
        "content_id": meta_frame["content_id"].astype(str).astype("string").to_numpy(),
        "quality": meta_frame["quality"].to_numpy(dtype=np.float64),
        "is_pseudo": meta_frame["is_pseudo"].to_numpy(dtype=bool),
        "row": np.arange(n, dtype=np.int64),
    })


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    tmp.replace(path)


def save_bank(out_dir: str | Path, embeddings: np.ndarray, meta_frame: pd.DataFrame,
              index: IndexInfo | faiss.Index, pairs: pd.DataFrame, summary: Mapping) -> Path:
    """Write the bank folder (layout in the module docstring); returns out_dir."""
    out_dir = Path(out_dir)
    x = check_embeddings(embeddings)
    n, dim = x.shape
    meta = _meta_table(meta_frame, n)
    faiss_index = index.index if isinstance(index, IndexInfo) else index
    if faiss_index.ntotal != n:
        raise DataError(f"the index holds {faiss_index.ntotal} vectors but {n} embeddings were given")
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise DataError(f"pair table lacks column(s) {missing}; build it with qfm.snm.mine_partners")
    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(faiss_index, str(out_dir / (INDEX_FILE + ".tmp")))
    (out_dir / (INDEX_FILE + ".tmp")).replace(out_dir / INDEX_FILE)
    with open(out_dir / (EMBEDDINGS_FILE + ".tmp"), "wb") as fh:
        np.save(fh, x)
    (out_dir / (EMBEDDINGS_FILE + ".tmp")).replace(out_dir / EMBEDDINGS_FILE)
    _write_parquet(meta, out_dir / BANK_FILE)
    _write_parquet(pairs[PAIR_COLUMNS].reset_index(drop=True), out_dir / PAIRS_FILE)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(dict(summary) | {"bank": _bank_info(meta, dim)}, indent=2)
                                        + "\n")
    return out_dir


def _bank_info(meta: pd.DataFrame, dim: int) -> dict:
    return {"n": len(meta), "dim": int(dim), "n_pseudo": int(meta["is_pseudo"].sum()),
            "n_labelled": int((~meta["is_pseudo"]).sum())}


def _read_parquet(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist: run `qfm build-bank` first")
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{what} {path} is not a readable Parquet file ({exc}); re-run `qfm build-bank`") from exc


def load_bank(bank_dir: str | Path) -> Bank:
    """Read a bank folder back (not the pair table: see load_pairs), checking that its parts agree."""
    bank_dir = Path(bank_dir)
    if not bank_dir.is_dir():
        raise DataError(f"bank folder {bank_dir} does not exist: run `qfm build-bank` first")
    meta = _read_parquet(bank_dir / BANK_FILE, "bank table")
    for name in (INDEX_FILE, EMBEDDINGS_FILE, SUMMARY_FILE):
        if not (bank_dir / name).is_file():
            raise DataError(f"bank folder {bank_dir} has no {name}: re-run `qfm build-bank`")
    try:
        index = faiss.read_index(str(bank_dir / INDEX_FILE))
    except RuntimeError as exc:
        raise DataError(f"{bank_dir / INDEX_FILE} is not a readable faiss index ({exc}); "
                        "re-run `qfm build-bank`") from exc
    embeddings = np.load(bank_dir / EMBEDDINGS_FILE)
    summary = json.loads((bank_dir / SUMMARY_FILE).read_text())
    if not len(meta) == embeddings.shape[0] == index.ntotal:
        raise DataError(f"bank folder {bank_dir} is inconsistent: {len(meta)} metadata rows, "
                        f"{embeddings.shape[0]} embeddings, {index.ntotal} indexed vectors; re-run `qfm build-bank`")
    return Bank(embeddings=embeddings, meta=meta, index=index, summary=summary)


def load_pairs(path: str | Path) -> pd.DataFrame:
    """The pair table (a pairs.parquet file or the bank folder holding it), validated.

    A missing or unreadable file, missing columns, or an empty table (no anchor got a partner) raise
    DataError; the caller decides what to do about an empty table.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PAIRS_FILE
    pairs = _read_parquet(path, "pair table")
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise DataError(f"pair table {path} lacks column(s) {missing}; found {list(pairs.columns)}; "
                        "re-run `qfm build-bank`")
    if pairs.empty:
        raise DataError(f"pair table {path} is empty: no anchor got a noise partner{_mining_note(path)}. "
                        "Loosen the rule (a smaller tau for 'aliasing', a larger delta for 'semantic'), raise k, "
                        "or switch SNM/QCC off")
    if pairs[["anchor_id", "partner_id"]].isna().any().any():
        raise DataError(f"pair table {path} has rows without an anchor_id or partner_id; re-run `qfm build-bank`")
    return pairs[PAIR_COLUMNS]


def _mining_note(pairs_path: Path) -> str:
    summary_path = pairs_path.parent / SUMMARY_FILE
    try:
        summary = json.loads(summary_path.read_text())
        return f" (rule '{summary['rule']}', {summary['params']}, over {summary['n_anchors']} anchors)"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def partners_by_anchor(pairs: pd.DataFrame) -> dict[str, list[str]]:
    """anchor_id -> its partner ids in rank order (only anchors that have partners)."""
    if pairs.empty:
        return {}
    ordered = pairs.sort_values(["anchor_id", "rank"], kind="stable")
    anchors = ordered["anchor_id"].to_numpy(dtype=str)
    partners = ordered["partner_id"].to_numpy(dtype=str)
    starts = np.flatnonzero(np.r_[True, anchors[1:] != anchors[:-1]])
    return dict(zip(anchors[starts].tolist(), (p.tolist() for p in np.split(partners, starts[1:]))))


def index_and_mine(out_dir: str | Path, embeddings: np.ndarray, meta_frame: pd.DataFrame, *, rule: str = "aliasing",
               k: int = 32, tau: float = 0.2, delta: float = 0.05, max_partners: int = 4,
               index_options: Mapping | None = None, omp_threads: int | None = None) -> dict:
    """Index, mine and save a bank in one call; returns the summary that was written (with ``bank``).

    meta_frame has META_COLUMNS, one row per embedding row; index_options go to build_index
    (kind, ann_threshold, nlist, nprobe, hnsw_m, ef_search, seed).
    """
    x = check_embeddings(embeddings)
    meta = _meta_table(meta_frame, x.shape[0])
    info = build_index(x, omp_threads=omp_threads, **dict(index_options or {}))
    start = time.perf_counter()
    pairs = mine_partners(x, meta["image_id"], meta["content_id"], meta["quality"], rule=rule, k=k, tau=tau,
                          delta=delta, max_partners=max_partners, index=info, omp_threads=omp_threads)
    summary = summarize_pairs(pairs, len(meta), rule=rule, k=k, tau=tau, delta=delta,
                              max_partners=max_partners, index=info)
    summary["mining_seconds"] = round(time.perf_counter() - start, 3)
    summary["bank"] = _bank_info(meta, x.shape[1])
    save_bank(out_dir, x, meta, info, pairs, summary)
    return summary
