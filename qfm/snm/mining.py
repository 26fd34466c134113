"""Noise-partner mining over the feature bank: the pair table and its summary.

For every anchor (each bank row) the candidates are its k nearest *eligible* neighbours: the index is
searched for k + (size of the largest content group) neighbours, which is always enough, and the anchor
itself and every image with the anchor's content_id are removed before the first k are kept. Then:

- ``aliasing``: candidates whose quality differs from the anchor's by at least tau (|dq| >= tau), most
  similar first: similar features, different quality (the feature-aliasing cases).
- ``semantic``: candidates whose quality is within delta of the anchor's (|dq| <= delta), *least* similar
  first: same quality, the most different content among the neighbours (pure semantic noise).

Each anchor keeps at most ``max_partners`` partners in that order (``rank`` 1 = first). Anchors without a
qualifying candidate get no rows. Quality gaps are partner - anchor; the comparisons allow 1e-9 of float
rounding so a gap of exactly tau (or delta) on the decimal scale counts.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import faiss
import numpy as np
import pandas as pd

from qfm.errors import ConfigError, DataError
from qfm.snm.index import IndexInfo, build_index, check_embeddings, search

RULES = ("aliasing", "semantic")
PAIR_COLUMNS = ["anchor_id", "partner_id", "similarity", "quality_gap", "rank", "rule"]
GAP_EPS = 1e-9


def check_rule(rule: str) -> str:
    """The rule name, or a ConfigError listing the known rules."""
    key = str(rule).strip().lower()
    if key not in RULES:
        close = difflib.get_close_matches(key, RULES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown matching rule '{rule}'.{hint} Known rules: {', '.join(RULES)}")
    return key


def _check_params(k: int, tau: float, delta: float, max_partners: int) -> None:
    if int(k) < 1:
        raise ConfigError(f"k (neighbours searched per anchor) must be a positive integer (got {k})")
    if not 0.0 < float(tau) <= 1.0:
        raise ConfigError(f"tau (minimum quality gap for 'aliasing') must be in (0, 1] (got {tau})")
    if not 0.0 <= float(delta) < 1.0:
        raise ConfigError(f"delta (maximum quality gap for 'semantic') must be in [0, 1) (got {delta})")
    if int(max_partners) < 1:
        raise ConfigError(f"max_partners must be a positive integer (got {max_partners})")


def _check_meta(n: int, ids: Sequence, content_ids: Sequence, quality: Sequence) -> tuple[np.ndarray, ...]:
    ids = np.asarray(ids).astype(str)
    content = np.asarray(content_ids).astype(str)
    q = np.asarray(quality, dtype=np.float64)
    for name, arr in (("ids", ids), ("content_ids", content), ("quality", q)):
        if arr.shape != (n,):
            raise DataError(f"{name} has shape {arr.shape}; it must hold one value per embedding row ({n})")
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise DataError(f"image id '{ids[dup][0]}' appears more than once in the bank ({int(dup.sum())} "
                        "duplicates); every bank row needs a unique image id")
    bad = ~np.isfinite(q) | (q < 0.0) | (q > 1.0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"quality of '{ids[row]}' (row {row}) is {q[row]}; bank qualities must be finite and "
                        f"in [0, 1] ({int(bad.sum())} bad rows)")
    return ids, content, q


def mine_partners(embeddings: np.ndarray, ids: Sequence, content_ids: Sequence, quality: Sequence,
                  rule: str = "aliasing", k: int = 32, tau: float = 0.2, delta: float = 0.05,
                  max_partners: int = 4, index: IndexInfo | faiss.Index | None = None,
                  omp_threads: int | None = None) -> pd.DataFrame:
    """The pair table (PAIR_COLUMNS) for every anchor under rule; see the module docstring.

    index: an IndexInfo (or faiss index) over exactly these embeddings, rows in the same order; built
    with build_index's defaults when None.
    """
    rule = check_rule(rule)
    _check_params(k, tau, delta, max_partners)
    x = check_embeddings(embeddings)
    n = x.shape[0]
    ids, content, q = _check_meta(n, ids, content_ids, quality)
    if index is None:
        index = build_index(x, omp_threads=omp_threads)
    ntotal = index.index.ntotal if isinstance(index, IndexInfo) else index.ntotal
    if ntotal != n:
        raise DataError(f"the index holds {ntotal} vectors but {n} embeddings were given: rebuild the index "
                        "from these embeddings")
    codes, group_sizes = np.unique(content, return_inverse=True, return_counts=True)[1:]
    search_k = min(n, int(k) + int(group_sizes.max()))
    sims, nbrs = search(index, x, search_k, omp_threads=omp_threads)
    return _select(sims, nbrs, ids, codes, q, rule, int(k), float(tau), float(delta), int(max_partners))


def _select(sims: np.ndarray, nbrs: np.ndarray, ids: np.ndarray, codes: np.ndarray, q: np.ndarray,
            rule: str, k: int, tau: float, delta: float, max_partners: int) -> pd.DataFrame:
    """Vectorised rule over the (n, search_k) neighbour matrix."""
    n = nbrs.shape[0]
    order = np.argsort(-sims, axis=1, kind="stable")  # faiss sorts already; make it a guarantee
    sims = np.take_along_axis(sims, order, axis=1)
    nbrs = np.take_along_axis(nbrs, order, axis=1)
    anchors = np.arange(n)[:, None]
    found = nbrs >= 0
    safe = np.where(found, nbrs, 0)
    eligible = found & (safe != anchors) & (codes[safe] != codes[:, None])
    candidate = eligible & (np.cumsum(eligible, axis=1) <= k)
    gap = q[safe] - q[:, None]
    if rule == "aliasing":
        keep = candidate & (np.abs(gap) >= tau - GAP_EPS)
        rank = np.cumsum(keep, axis=1)  # most similar first
    else:
        keep = candidate & (np.abs(gap) <= delta + GAP_EPS)
        rank = np.cumsum(keep[:, ::-1], axis=1)[:, ::-1]  # least similar first
    keep &= rank <= max_partners
    rows, cols = np.nonzero(keep)
    frame = pd.DataFrame({
        "anchor_id": pd.array(ids[rows], dtype="string"),
        "partner_id": pd.array(ids[nbrs[rows, cols]], dtype="string"),
        "similarity": sims[rows, cols].astype(np.float32),
        "quality_gap": gap[rows, cols].astype(np.float32),
        "rank": rank[rows, cols].astype(np.int32),
        "rule": pd.array([rule] * len(rows), dtype="string"),
    })
    return frame.iloc[np.lexsort((frame["rank"].to_numpy(), rows))].reset_index(drop=True)  # bank order, rank


def _histogram(values: np.ndarray, bins: np.ndarray) -> dict:
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def summarize_pairs(pairs: pd.DataFrame, n_anchors: int, *, rule: str, k: int, tau: float, delta: float,
                    max_partners: int, index: IndexInfo | None = None, gap_bins: int = 20) -> dict:
    """JSON-ready numbers on a pair table mined over n_anchors anchors with the given rule and parameters.

    Anchors with and without partners, partners per anchor (mean/median/max over all anchors, and a
    histogram of counts 0 … max_partners), the quality-gap histogram (gap_bins equal bins over [-1, 1]),
    similarity statistics, and the index kind and its measured recall.
    """
    if n_anchors < 1:
        raise ConfigError(f"n_anchors must be positive (got {n_anchors})")
    per_anchor = pairs.groupby("anchor_id", sort=False).size().to_numpy() if len(pairs) else np.zeros(0, int)
    if len(per_anchor) > n_anchors:
        raise DataError(f"the pair table has {len(per_anchor)} distinct anchors but n_anchors is {n_anchors}")
    counts = np.concatenate([per_anchor, np.zeros(n_anchors - len(per_anchor), dtype=int)])
    count_hist = np.bincount(counts, minlength=int(max_partners) + 1)
    sim = pairs["similarity"].to_numpy(dtype=np.float64)
    gap = pairs["quality_gap"].to_numpy(dtype=np.float64)
    summary = {
        "rule": check_rule(rule),
        "params": {"k": int(k), "tau": float(tau), "delta": float(delta), "max_partners": int(max_partners)},
        "n_anchors": int(n_anchors),
        "n_pairs": len(pairs),
        "anchors_with_partner": int((counts > 0).sum()),
        "anchors_without_partner": int((counts == 0).sum()),
        "partners_per_anchor": {
            "mean": float(counts.mean()), "median": float(np.median(counts)), "max": int(counts.max()),
            "histogram": {str(i): int(c) for i, c in enumerate(count_hist)},
        },
        "quality_gap": {
            "abs_mean": float(np.abs(gap).mean()) if len(gap) else None,
            "histogram": _histogram(gap, np.linspace(-1.0, 1.0, int(gap_bins) + 1)),
        },
        "similarity": {stat: (float(fn(sim)) if len(sim) else None) for stat, fn in
                       (("min", np.min), ("mean", np.mean), ("median", np.median), ("max", np.max))},
        "index": index.describe() if isinstance(index, IndexInfo) else None,
    }
    return summary
