"""SNM speed and recall: index build + neighbour search + partner mining on a 100,000 x 384 bank.

The bank is random but structured like teacher embeddings of an IQA training set: 100 broad topics,
each split into many small content groups (a reference image and its distorted versions, sharing a
content_id and lying close together), plus per-image noise; rows are L2-normalised. Qualities are
uniform in [0, 1]. For each approximate index kind the script reports the build time (which includes
measuring recall@32 against exact search on --recall-queries sampled rows), then for each rule the time
of mine_partners (the search for k + largest content group neighbours and the vectorised selection).
Exact search is timed on --exact-queries rows and extrapolated to the whole bank (--exact-full runs it).

Timings are wall-clock and process CPU seconds; on a machine shared with other jobs the wall-clock
figures move a lot, so the script also reports the sgemm rate it measured at the start.

    python benchmarks/bench_mining.py --threads 2 --json mining.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import faiss
import numpy as np

from qfm.errors import QfmError
from qfm.snm import RULES, build_index, configure_faiss, exact_search, mine_partners, summarize_pairs

SHOWN_PARAMS = ("nlist", "nprobe", "hnsw_m", "ef_search")


def make_bank(n: int, dim: int, topics: int = 100, group_size: float = 5.0, topic_weight: float = 1.0,
              group_weight: float = 0.6, noise_weight: float = 0.8, seed: int = 0):
    """(embeddings, ids, content_ids, quality): topic centre + content-group offset + noise, normalised."""
    rng = np.random.default_rng(seed)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    n_groups = max(1, round(n / group_size))
    topic_of_group = rng.integers(0, topics, n_groups)
    group = rng.integers(0, n_groups, n)
    x = (topic_weight * unit(rng.standard_normal((topics, dim), dtype=np.float32))[topic_of_group[group]]
         + group_weight * unit(rng.standard_normal((n_groups, dim), dtype=np.float32))[group]
         + noise_weight * unit(rng.standard_normal((n, dim), dtype=np.float32)))
    ids = np.array([f"img{i:06d}" for i in range(n)])
    content = np.array([f"ref{g:05d}" for g in group])
    return unit(x).astype(np.float32), ids, content, rng.uniform(0.0, 1.0, n)


def timed(fn, *args, **kwargs):
    """(result, wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def sgemm_rate(dim: int) -> float:
    """GFLOP/s of a 2048 x 20000 x dim float32 matrix product (numpy BLAS), to judge the machine's load."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2048, dim), dtype=np.float32)
    b = rng.standard_normal((20000, dim), dtype=np.float32)
    _, wall, _ = timed(np.matmul, a, b.T)
    return 2 * a.shape[0] * b.shape[0] * dim / wall / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--kinds", default="ivf,hnsw", help="comma-separated approximate index kinds")
    parser.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=5000)
    parser.add_argument("--exact-full", action="store_true", help="time exact search of the whole bank")
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--ef-search", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        configure_faiss(args.threads)
        x, ids, content, quality = make_bank(args.n, args.dim, seed=args.seed)
        _, groups = np.unique(content, return_counts=True)
        rate = sgemm_rate(args.dim)
        print(f"bank {args.n} x {args.dim}, {len(groups)} content groups (largest {groups.max()}), k={args.k}, "
              f"faiss {faiss.__version__}, {args.threads} threads, sgemm {rate:.0f} GFLOP/s")
        results: dict = {"n": args.n, "dim": args.dim, "k": args.k, "threads": args.threads,
                         "faiss": faiss.__version__, "python": platform.python_version(),
                         "sgemm_gflops": round(rate, 1), "largest_content_group": int(groups.max()), "runs": []}

        n_exact = args.n if args.exact_full else min(args.exact_queries, args.n)
        _, wall, cpu = timed(exact_search, x, x[:n_exact], args.k + int(groups.max()))
        scale = args.n / n_exact
        results["exact"] = {"queries": n_exact, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                            "full_bank_wall_s": round(wall * scale, 1), "full_bank_cpu_s": round(cpu * scale, 1),
                            "extrapolated": n_exact < args.n}
        print(f"exact search, {n_exact} queries: {wall:.1f} s wall, {cpu:.1f} s CPU -> whole bank "
              f"{'(extrapolated) ' if n_exact < args.n else ''}{wall * scale:.0f} s wall, {cpu * scale:.0f} s CPU")

        rows = []
        for kind in [s.strip() for s in args.kinds.split(",") if s.strip()]:
            options = {key: val for key, val in (("nlist", args.nlist), ("nprobe", args.nprobe),
                                                 ("ef_search", args.ef_search)) if val is not None}
            if kind != "ivf":
                options.pop("nlist", None), options.pop("nprobe", None)
            if kind != "hnsw":
                options.pop("ef_search", None)
            info, b_wall, b_cpu = timed(build_index, x, kind=kind, seed=args.seed,
                                        recall_queries=args.recall_queries, **options)
            for rule in RULES:
                pairs, m_wall, m_cpu = timed(mine_partners, x, ids, content, quality, rule=rule, k=args.k,
                                             index=info)
                summary = summarize_pairs(pairs, args.n, rule=rule, k=args.k, tau=0.2, delta=0.05,
                                          max_partners=4, index=info)
                row = {"kind": kind, "params": info.params, "rule": rule, "recall_at_32": info.recall,
                       "build_wall_s": round(b_wall, 2), "build_cpu_s": round(b_cpu, 2),
                       "index_only_s": round(info.build_seconds, 2), "recall_tuning_s": round(info.recall_seconds, 2),
                       "mine_wall_s": round(m_wall, 2), "mine_cpu_s": round(m_cpu, 2),
                       "total_wall_s": round(b_wall + m_wall, 2), "total_cpu_s": round(b_cpu + m_cpu, 2),
                       "pairs": summary["n_pairs"], "anchors_with_partner": summary["anchors_with_partner"]}
                rows.append(row)
                print(f"  {kind} {rule} done: total {b_wall + m_wall:.1f} s wall", flush=True)
        results["runs"] = rows

        header = ["index", "params", "rule", "recall@32", "build s (incl. recall)", "mine s", "total s (wall)", "total s (CPU)",
                  "anchors with partner"]
        print("\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
        for r in rows:
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k in SHOWN_PARAMS)
            print(f"| {r['kind']} | {params} | {r['rule']} | {r['recall_at_32']:.4f} | {r['build_wall_s']:.1f} | "
                  f"{r['mine_wall_s']:.1f} | {r['total_wall_s']:.1f} | {r['total_cpu_s']:.1f} | "
                  f"{r['anchors_with_partner']} |")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2)
            print(f"\nwrote {args.json}")
    except QfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
