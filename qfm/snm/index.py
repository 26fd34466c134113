"""The faiss index over the feature bank: exact inner product by default, IVF-Flat or HNSW above a size.

Embeddings are L2-normalised float32 rows, so inner product = cosine similarity. Defaults:

- ``kind='auto'``: exact (``IndexFlatIP``) below ``ann_threshold`` rows (50,000), IVF-Flat from there on.
- IVF-Flat (inner-product metric): ``nlist`` = round(2 sqrt(n)) lists (632 for 100,000 rows), at most
  n // 39 so k-means has enough points per list; k-means (faiss' 10 iterations, seeded) on a seeded
  sample of at most 64 points per list; ``nprobe`` = 8 lists searched per query.
- HNSW-Flat (inner-product metric): ``hnsw_m`` = 32 links, efConstruction 40 (faiss' default),
  ``ef_search`` = 128 (raised to k at search time when k is larger). A multi-threaded HNSW build is
  not bit-for-bit reproducible; IVF is (seeded sample and k-means).

After an approximate index is built, its recall@32 against exact search is measured on 1,000 sampled
rows and stored in ``IndexInfo.recall``; while it is below ``min_recall`` (0.95) nprobe or ef_search
is doubled (IVF reaches exact search at nprobe = nlist). Recall depends on the data far more than on n,
so the defaults are a fast start and the measurement decides.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from qfm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

KINDS = ("auto", "exact", "ivf", "hnsw")
ANN_THRESHOLD = 50_000
DEFAULT_NPROBE = 8
DEFAULT_HNSW_M = 32
DEFAULT_EF_SEARCH = 128
MAX_EF_SEARCH = 1024
MIN_RECALL = 0.95
HNSW_EF_CONSTRUCTION = 40
IVF_TRAIN_PER_LIST = 64
RECALL_K = 32
RECALL_QUERIES = 1000
# faiss runs exact batched search (and k-means assignment) through BLAS only for batches of at least
# distance_compute_blas_threshold queries. faiss-cpu here ships it at 128,000, so batches skip BLAS;
# at 20 a 2,000 x 100,000 x 384 exact search ran 3.8x faster on this machine (the design notes saw 9x).
BLAS_THRESHOLD = 20
NORM_TOLERANCE = 1e-3
GROUPED_SEARCH_MIN = 1000  # IVF searches with at least this many queries go list by list (see search)


@dataclass
class IndexInfo:
    """A built index and how it was built: kind ('exact', 'ivf', 'hnsw'), sizes, parameters, recall.

    build_seconds covers building the index; recall_seconds measuring (and tuning) its recall.
    """

    index: faiss.Index
    kind: str
    n: int
    dim: int
    params: dict = field(default_factory=dict)
    recall: float | None = None
    recall_k: int | None = None
    recall_queries: int | None = None
    build_seconds: float = 0.0
    recall_seconds: float = 0.0

    def describe(self) -> dict:
        """JSON-ready description (no index object) for the bank summary."""
        return {"kind": self.kind, "n": self.n, "dim": self.dim, "params": dict(self.params),
                "recall": self.recall, "recall_k": self.recall_k, "recall_queries": self.recall_queries,
                "build_seconds": round(self.build_seconds, 3), "recall_seconds": round(self.recall_seconds, 3)}


def configure_faiss(omp_threads: int | None = None) -> None:
    """The one place faiss is tuned: BLAS for batched exact search, and the thread count when given."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    if omp_threads is not None:
        if int(omp_threads) < 1:
            raise ConfigError(f"omp_threads must be a positive integer (got {omp_threads})")
        faiss.omp_set_num_threads(int(omp_threads))


def check_embeddings(embeddings: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """A C-contiguous float32 (n, C) array of finite, L2-normalised rows, or a DataError naming the row."""
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{what} must be a non-empty 2-D array (n, C); got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{what} row {row} holds NaN or infinite values ({int((~finite).sum())} such rows); "
                        "re-run the embedding step")
    norms = np.linalg.norm(arr, axis=1)
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{what} row {row} has L2 norm {norms[row]:.4f} ({int(bad.sum())} rows are not unit "
                        "length): the bank expects L2-normalised embeddings so inner product is cosine "
                        "similarity; normalise them first")
    return arr


def resolve_kind(kind: str, n: int, ann_threshold: int = ANN_THRESHOLD) -> str:
    """The concrete index kind for n rows; an unknown kind lists the known ones."""
    key = str(kind).strip().lower()
    if key not in KINDS:
        close = difflib.get_close_matches(key, KINDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown index kind '{kind}'.{hint} Known kinds: {', '.join(KINDS)}")
    if key == "auto":
        return "exact" if n < ann_threshold else "ivf"
    return key


def default_nlist(n: int) -> int:
    """round(2 sqrt(n)) inverted lists, at most n // 39 so k-means has enough points per list."""
    return max(1, min(round(2 * math.sqrt(n)), n // 39))


def build_index(embeddings: np.ndarray, kind: str = "auto", ann_threshold: int = ANN_THRESHOLD,
                nlist: int | None = None, nprobe: int = DEFAULT_NPROBE, hnsw_m: int = DEFAULT_HNSW_M,
                ef_search: int = DEFAULT_EF_SEARCH, seed: int = 0, omp_threads: int | None = None,
                min_recall: float | None = MIN_RECALL, recall_k: int = RECALL_K,
                recall_queries: int = RECALL_QUERIES) -> IndexInfo:
    """Index L2-normalised embeddings for inner-product search (see the module docstring for defaults).

    An approximate index ('ivf', 'hnsw') gets its recall@recall_k against exact search measured on
    recall_queries sampled rows (seeded) and stored in the returned IndexInfo. While that recall is below
    min_recall, nprobe (IVF, up to nlist, which is exact) or ef_search (HNSW, up to MAX_EF_SEARCH) is
    doubled and the recall measured again; every step is kept in params['recall_steps']. None turns the
    tuning off.
    """
    configure_faiss(omp_threads)
    x = check_embeddings(embeddings)
    n, dim = x.shape
    if ann_threshold < 1:
        raise ConfigError(f"ann_threshold must be a positive number of rows (got {ann_threshold})")
    if min_recall is not None and not 0.0 < float(min_recall) <= 1.0:
        raise ConfigError(f"min_recall must be in (0, 1] or None (got {min_recall})")
    concrete = resolve_kind(kind, n, ann_threshold)
    start = time.perf_counter()
    if concrete == "exact":
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        params: dict = {}
    elif concrete == "ivf":
        index, params = _build_ivf(x, nlist, nprobe, seed)
    else:
        index, params = _build_hnsw(x, hnsw_m, ef_search)
    info = IndexInfo(index=index, kind=concrete, n=n, dim=dim, params=params,
                     build_seconds=time.perf_counter() - start)
    if concrete != "exact" and n > 1:
        start = time.perf_counter()
        _measure_and_tune(info, x, min_recall, min(recall_k, n - 1), min(recall_queries, n), seed)
        info.recall_seconds = time.perf_counter() - start
    return info


def _measure_and_tune(info: IndexInfo, x: np.ndarray, min_recall: float | None, k: int, n_queries: int,
                      seed: int) -> None:
    """Measure recall; raise nprobe / ef_search by doubling until min_recall is met or the cap is reached."""
    sample = _recall_sample(x, k, n_queries, seed)
    knob, cap = ("nprobe", info.params["nlist"]) if info.kind == "ivf" else ("ef_search", MAX_EF_SEARCH)
    steps = []
    while True:
        recall = _recall(info.index, x, *sample)
        steps.append([info.params[knob], round(recall, 5)])
        if min_recall is None or recall >= min_recall or info.params[knob] >= cap:
            break
        value = min(2 * info.params[knob], cap)
        if info.kind == "ivf":
            info.index.nprobe = value
        else:
            info.index.hnsw.efSearch = value
        info.params[knob] = value
    info.recall, info.recall_k, info.recall_queries = recall, k, n_queries
    info.params["recall_steps"] = steps
    info.params["min_recall"] = min_recall
    if min_recall is not None and recall < min_recall:
        log.warning("%s index reaches recall@%d %.3f < min_recall %.3f even at %s=%d; consider kind='exact' "
                    "or a larger hnsw_m", info.kind, k, recall, min_recall, knob, info.params[knob])


def _build_ivf(x: np.ndarray, nlist: int | None, nprobe: int, seed: int) -> tuple[faiss.Index, dict]:
    n, dim = x.shape
    nlist = default_nlist(n) if nlist is None else int(nlist)
    if not 1 <= nlist <= n:
        raise ConfigError(f"nlist must be between 1 and the number of embeddings ({n}); got {nlist}")
    if int(nprobe) < 1:
        raise ConfigError(f"nprobe must be a positive integer (got {nprobe})")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    n_train = min(n, IVF_TRAIN_PER_LIST * nlist)
    train = x if n_train == n else x[np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))]
    index.cp.max_points_per_centroid = max(1, -(-n_train // nlist))  # keep the whole sample
    index.train(train)
    index.add(x)
    index.nprobe = min(int(nprobe), nlist)
    return index, {"nlist": nlist, "nprobe": int(index.nprobe), "n_train": n_train}


def _build_hnsw(x: np.ndarray, hnsw_m: int, ef_search: int) -> tuple[faiss.Index, dict]:
    if int(hnsw_m) < 2:
        raise ConfigError(f"hnsw_m must be an integer of at least 2 (got {hnsw_m})")
    if int(ef_search) < 1:
        raise ConfigError(f"ef_search must be a positive integer (got {ef_search})")
    index = faiss.IndexHNSWFlat(x.shape[1], int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = int(ef_search)
    index.add(x)
    return index, {"hnsw_m": int(hnsw_m), "ef_search": int(ef_search), "ef_construction": HNSW_EF_CONSTRUCTION}


def _as_index(index: IndexInfo | faiss.Index) -> faiss.Index:
    return index.index if isinstance(index, IndexInfo) else index


def search(index: IndexInfo | faiss.Index, queries: np.ndarray, k: int,
           omp_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, row ids), each (n_queries, k), most similar first; ids are -1 where fewer were found."""
    configure_faiss(omp_threads)
    idx = _as_index(index)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != idx.d:
        raise DataError(f"queries must have shape (n, {idx.d}) to match the index; got {q.shape}")
    if int(k) < 1:
        raise ConfigError(f"k must be a positive integer (got {k})")
    k = min(int(k), idx.ntotal)
    if isinstance(idx, faiss.IndexHNSW) and idx.hnsw.efSearch < k:
        return idx.search(q, k, params=faiss.SearchParametersHNSW(efSearch=k))
    if isinstance(idx, faiss.IndexIVF) and len(q) >= GROUPED_SEARCH_MIN:
        return _search_ivf_grouped(idx, q, k)
    return idx.search(q, k)


def _search_ivf_grouped(ivf: faiss.IndexIVF, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """IVF search with the queries taken in order of their nearest list, then put back in place.

    Same results as ivf.search; consecutive queries then scan mostly the same inverted lists, which stay
    in cache (1.7x faster on a whole-bank search of 100,000 x 384, nprobe 8, measured here).
    """
    _, nearest = ivf.quantizer.search(q, 1)
    order = np.argsort(nearest[:, 0], kind="stable")
    sims, ids = ivf.search(q[order], k)
    undo = np.empty_like(order)
    undo[order] = np.arange(len(order))
    return sims[undo], ids[undo]


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN of queries among embeddings (BLAS-batched brute force)."""
    configure_faiss()
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    return faiss.knn(q, x, min(int(k), x.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)


def _recall_sample(x: np.ndarray, k: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(query rows, exact k-th similarity per query excluding the query itself, k)."""
    n = x.shape[0]
    if not 1 <= int(k) < n:
        raise ConfigError(f"recall k must be between 1 and the number of embeddings - 1 ({n - 1}); got {k}")
    if not 1 <= int(n_queries) <= n:
        raise ConfigError(f"n_queries must be between 1 and the number of embeddings ({n}); got {n_queries}")
    rows = np.sort(np.random.default_rng(seed).choice(n, int(n_queries), replace=False))
    sims, ids = exact_search(x, x[rows], int(k) + 1)
    return rows, _drop_self(sims, ids, rows, int(k))[0][:, -1], int(k)


def _drop_self(sims: np.ndarray, ids: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k results of each row other than the query row itself."""
    order = np.argsort(ids == rows[:, None], axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _recall(index: IndexInfo | faiss.Index, x: np.ndarray, rows: np.ndarray, exact_kth: np.ndarray,
            k: int) -> float:
    q = x[rows]
    _, ann_ids = _drop_self(*search(index, q, k + 1), rows, k)
    found = ann_ids >= 0
    true_sims = np.einsum("qc,qkc->qk", q, x[np.where(found, ann_ids, 0)])
    hits = found & (true_sims >= exact_kth[:, None] - 1e-6)
    return float(hits.sum(axis=1).mean() / k)


def measure_recall(index: IndexInfo | faiss.Index, embeddings: np.ndarray, k: int = RECALL_K,
                   n_queries: int = RECALL_QUERIES, seed: int = 0) -> float:
    """recall@k of the index against exact search, over n_queries rows of embeddings sampled with seed.

    Each sampled row is a query; its own row is left out of both result lists. Per query: the share of
    the exact k nearest that the index returns, where a returned row counts when its true similarity
    reaches the exact k-th similarity (ties at the boundary are not misses); without ties this is the
    usual |ANN ∩ exact| / k. The mean over queries is returned.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    return _recall(index, x, *_recall_sample(x, k, n_queries, seed))
