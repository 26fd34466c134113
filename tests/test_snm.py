"""SNM: the faiss index, partner mining under both rules, the summary and the bank on disk."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest

from qfm.errors import ConfigError, DataError
from qfm.snm import (
    PAIR_COLUMNS,
    build_index,
    configure_faiss,
    index_and_mine,
    load_bank,
    load_pairs,
    measure_recall,
    mine_partners,
    partners_by_anchor,
    save_bank,
    search,
    summarize_pairs,
)
from qfm.snm.index import BLAS_THRESHOLD, GROUPED_SEARCH_MIN


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def random_bank(n: int = 500, dim: int = 32, seed: int = 0):
    """Unstructured unit vectors, content groups of 1-3 images, uniform qualities."""
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, dim)))
    content = np.array([f"c{i // 3 if i % 5 else i + 1000}" for i in range(n)])
    return x, np.array([f"img{i:04d}" for i in range(n)]), content, rng.uniform(0, 1, n)


def clustered(n: int, dim: int = 32, clusters: int = 30, spread: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    return unit(centres[rng.integers(0, clusters, n)] + spread * unit(rng.standard_normal((n, dim))))


def reference_pairs(x, ids, content, quality, rule, k, tau, delta, max_partners) -> pd.DataFrame:
    """The rules written out anchor by anchor, over brute-force similarities (the test's own reading)."""
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    rows = []
    for a in range(len(x)):
        others = [j for j in np.argsort(-sims[a], kind="stable") if j != a and content[j] != content[a]][:k]
        gaps = {j: quality[j] - quality[a] for j in others}
        if rule == "aliasing":
            chosen = [j for j in others if abs(gaps[j]) >= tau - 1e-9][:max_partners]
        else:
            chosen = [j for j in others if abs(gaps[j]) <= delta + 1e-9][::-1][:max_partners]
        rows += [(ids[a], ids[j], sims[a, j], gaps[j], r + 1) for r, j in enumerate(chosen)]
    return pd.DataFrame(rows, columns=["anchor_id", "partner_id", "similarity", "quality_gap", "rank"])


# ---------------------------------------------------------------- index


def test_exact_index_finds_true_neighbours_and_sets_blas_threshold():
    faiss.cvar.distance_compute_blas_threshold = 1 << 20
    x, *_ = random_bank()
    info = build_index(x)
    assert info.kind == "exact" and info.recall is None and info.index.ntotal == 500
    assert faiss.cvar.distance_compute_blas_threshold == BLAS_THRESHOLD
    sims, nbrs = search(info, x, 10)
    brute = x @ x.T
    expected = np.argsort(-brute, axis=1)[:, :10]
    assert np.array_equal(nbrs, expected)
    assert np.allclose(sims, np.take_along_axis(brute, expected, axis=1), atol=1e-5)
    assert np.array_equal(nbrs[:, 0], np.arange(500))  # each row's nearest is itself


def test_auto_kind_switches_to_ivf_at_threshold():
    x = clustered(600)
    assert build_index(x, ann_threshold=601).kind == "exact"
    info = build_index(x, ann_threshold=600)
    assert info.kind == "ivf" and info.params["nlist"] == 600 // 39  # 2 sqrt(n) capped at n // 39
    assert info.recall is not None and info.recall_k == 32


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_recall_at_default_settings(kind):
    x = clustered(4000, dim=32, clusters=40)
    info = build_index(x, kind=kind, min_recall=None, recall_queries=400)
    assert info.recall >= 0.95, info.describe()
    assert info.params["recall_steps"] == [[info.params["nprobe" if kind == "ivf" else "ef_search"],
                                            round(info.recall, 5)]]
    assert measure_recall(info, x, k=32, n_queries=400, seed=0) == pytest.approx(info.recall)


def test_recall_tuning_raises_nprobe_until_target():
    x = clustered(3000, clusters=20, spread=2.0)
    low = build_index(x, kind="ivf", nlist=60, nprobe=1, min_recall=None, recall_queries=300)
    tuned = build_index(x, kind="ivf", nlist=60, nprobe=1, min_recall=0.98, recall_queries=300)
    assert low.recall < 0.98
    steps = tuned.params["recall_steps"]
    assert [s[0] for s in steps] == [min(2 ** i, 60) for i in range(len(steps))] and len(steps) > 1
    assert tuned.recall >= 0.98 and tuned.index.nprobe == tuned.params["nprobe"] == steps[-1][0]
    assert all(s[1] < 0.98 for s in steps[:-1])


def test_measure_recall_matches_set_overlap():
    x, *_ = random_bank(800, 16)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 16, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    index.nprobe = 2
    rows = np.sort(np.random.default_rng(3).choice(800, 200, replace=False))
    brute = x[rows] @ x.T
    brute[np.arange(200), rows] = -np.inf  # the query itself is left out
    exact = np.argsort(-brute, axis=1)[:, :10]
    _, ann = index.search(x[rows], 11)
    overlap = [len(set(e) & (set(a[a >= 0]) - {r})) / 10 for e, a, r in zip(exact, ann, rows)]
    assert measure_recall(index, x, k=10, n_queries=200, seed=3) == pytest.approx(np.mean(overlap))
    assert measure_recall(build_index(x, kind="exact"), x, k=10, n_queries=200) == 1.0


def test_grouped_ivf_search_equals_plain_search():
    x = clustered(GROUPED_SEARCH_MIN + 200, dim=16)
    info = build_index(x, kind="ivf", nlist=25, nprobe=3, min_recall=None)
    sims, nbrs = search(info, x, 12)
    plain_sims, plain_nbrs = info.index.search(x, 12)
    assert np.array_equal(nbrs, plain_nbrs) and np.array_equal(sims, plain_sims)


def test_index_options_are_checked():
    x, *_ = random_bank(100, 8)
    with pytest.raises(ConfigError, match="unknown index kind 'hnws'.*Did you mean 'hnsw'"):
        build_index(x, kind="hnws")
    with pytest.raises(ConfigError, match="nlist must be between 1 and .*100"):
        build_index(x, kind="ivf", nlist=500)
    with pytest.raises(ConfigError, match="omp_threads"):
        configure_faiss(0)
    with pytest.raises(DataError, match="row 7 has L2 norm 2.0000"):
        build_index(np.where(np.arange(100)[:, None] == 7, 2 * x, x))
    with pytest.raises(DataError, match="row 3 holds NaN"):
        build_index(np.where(np.arange(100)[:, None] == 3, np.nan, x))


def test_omp_threads_are_applied():
    before = faiss.omp_get_max_threads()
    try:
        x, *_ = random_bank(100, 8)
        build_index(x, omp_threads=1)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------- mining


def hand_bank():
    """Anchor 'a' (quality 0.5) and neighbours at known cosines; 's1', 's2' share a's content."""
    sims = {"s1": 0.999, "s2": 0.998, "b": 0.99, "c": 0.95, "d": 0.9, "e": 0.8, "f": 0.7, "g": 0.1}
    quality = {"a": 0.5, "s1": 0.9, "s2": 0.1, "b": 0.52, "c": 0.9, "d": 0.48, "e": 0.5, "f": 0.1, "g": 0.5}
    dim = len(sims) + 1
    rows = [np.eye(dim)[0]]
    for i, cos in enumerate(sims.values()):  # each neighbour in its own direction: cos to 'a' is exact
        rows.append(cos * np.eye(dim)[0] + np.sqrt(1 - cos ** 2) * np.eye(dim)[i + 1])
    ids = ["a", *sims]
    content = ["ref_a", "ref_a", "ref_a"] + [f"ref_{i}" for i in ids[3:]]
    return np.array(rows, dtype=np.float32), ids, content, [quality[i] for i in ids]


def anchor_rows(pairs: pd.DataFrame, anchor: str = "a") -> list[tuple]:
    rows = pairs[pairs["anchor_id"] == anchor]
    return [(p, round(float(s), 3), round(float(g), 2), int(r))
            for p, s, g, r in zip(rows["partner_id"], rows["similarity"], rows["quality_gap"], rows["rank"])]


def test_aliasing_on_a_hand_built_bank():
    x, ids, content, quality = hand_bank()
    pairs = mine_partners(x, ids, content, quality, rule="aliasing", k=5, tau=0.4, max_partners=4)
    # s1, s2 (same content) and a itself are skipped; the 5 nearest others are b c d e f; |dq| >= 0.4: c, f
    assert anchor_rows(pairs) == [("c", 0.95, 0.4, 1), ("f", 0.7, -0.4, 2)]
    assert set(pairs["rule"]) == {"aliasing"} and list(pairs.columns) == PAIR_COLUMNS
    pairs = mine_partners(x, ids, content, quality, rule="aliasing", k=4, tau=0.4)
    assert anchor_rows(pairs) == [("c", 0.95, 0.4, 1)]  # f is the 5th eligible neighbour: outside k=4


def test_semantic_on_a_hand_built_bank():
    x, ids, content, quality = hand_bank()
    pairs = mine_partners(x, ids, content, quality, rule="semantic", k=5, delta=0.02, max_partners=2)
    # within the 5 nearest eligible, |dq| <= 0.02: b (0.99), d (0.9), e (0.8); least similar first
    assert anchor_rows(pairs) == [("e", 0.8, 0.0, 1), ("d", 0.9, -0.02, 2)]
    pairs = mine_partners(x, ids, content, quality, rule="semantic", k=8, delta=0.02, max_partners=1)
    assert anchor_rows(pairs) == [("g", 0.1, 0.0, 1)]  # g (cos 0.1) joins the window at k=8


@pytest.mark.parametrize("rule", ["aliasing", "semantic"])
def test_mining_matches_the_rule_written_out(rule):
    x, ids, content, quality = random_bank()
    pairs = mine_partners(x, ids, content, quality, rule=rule, k=12, tau=0.5, delta=0.08, max_partners=3)
    expected = reference_pairs(x, ids, content, quality, rule, 12, 0.5, 0.08, 3)
    assert len(pairs) == len(expected) > 300
    got = pairs.drop(columns="rule")
    assert list(got["anchor_id"]) == list(expected["anchor_id"])
    assert list(got["partner_id"]) == list(expected["partner_id"])
    assert list(got["rank"]) == list(expected["rank"])
    assert np.allclose(got["similarity"], expected["similarity"], atol=1e-5)
    assert np.allclose(got["quality_gap"], expected["quality_gap"], atol=1e-6)
    content_of = dict(zip(ids, content))
    assert not (pairs["anchor_id"] == pairs["partner_id"]).any()
    assert not any(content_of[a] == content_of[p] for a, p in zip(pairs["anchor_id"], pairs["partner_id"]))
    gaps = pairs["quality_gap"].abs()
    assert (gaps >= 0.5 - 1e-6).all() if rule == "aliasing" else (gaps <= 0.08 + 1e-6).all()
    step = pairs.groupby("anchor_id")["similarity"].diff().dropna()
    assert (step <= 1e-7).all() if rule == "aliasing" else (step >= -1e-7).all()


def test_mining_with_an_ivf_index_and_a_big_content_group():
    x = clustered(1000, dim=16)
    ids = [f"i{i}" for i in range(1000)]
    content = ["big" if i < 60 else f"c{i}" for i in range(1000)]  # searches k + 60 neighbours
    quality = np.random.default_rng(1).uniform(0, 1, 1000)
    info = build_index(x, kind="ivf", min_recall=0.99, recall_queries=300)
    pairs = mine_partners(x, ids, content, quality, rule="aliasing", k=8, index=info)
    exact = mine_partners(x, ids, content, quality, rule="aliasing", k=8)
    big = pairs["anchor_id"].isin(ids[:60])
    assert big.sum() > 0 and not pairs[big]["partner_id"].isin(ids[:60]).any()
    agree = len(pairs.merge(exact, on=["anchor_id", "partner_id"])) / len(exact)
    assert agree >= 0.95


def test_mining_input_errors():
    x, ids, content, quality = random_bank(50, 8)
    with pytest.raises(ConfigError, match="unknown matching rule 'aliassing'.*Did you mean 'aliasing'"):
        mine_partners(x, ids, content, quality, rule="aliassing")
    with pytest.raises(ConfigError, match="tau"):
        mine_partners(x, ids, content, quality, tau=0)
    with pytest.raises(DataError, match="image id 'img0001' appears more than once"):
        mine_partners(x, ["img0001"] * 50, content, quality)
    bad_q = quality.copy()
    bad_q[4] = 1.5
    with pytest.raises(DataError, match=r"quality of 'img0004' \(row 4\) is 1.5"):
        mine_partners(x, ids, content, bad_q)
    with pytest.raises(DataError, match="one value per embedding row"):
        mine_partners(x, ids, content[:-1], quality)
    with pytest.raises(DataError, match="index holds 40 vectors but 50"):
        mine_partners(x, ids, content, quality, index=build_index(x[:40]))


# ---------------------------------------------------------------- summary


def test_summary_numbers_on_a_hand_built_table():
    pairs = pd.DataFrame({
        "anchor_id": ["a", "a", "b"], "partner_id": ["b", "c", "a"],
        "similarity": [0.9, 0.6, 0.75], "quality_gap": [0.45, -0.35, 0.25], "rank": [1, 2, 1],
        "rule": ["aliasing"] * 3,
    })
    info = build_index(clustered(500), kind="ivf", recall_queries=100)
    s = summarize_pairs(pairs, 4, rule="aliasing", k=32, tau=0.2, delta=0.05, max_partners=4, index=info)
    assert s["n_pairs"] == 3 and s["anchors_with_partner"] == 2 and s["anchors_without_partner"] == 2
    ppa = s["partners_per_anchor"]
    assert (ppa["mean"], ppa["median"], ppa["max"]) == (0.75, 0.5, 2)
    assert ppa["histogram"] == {"0": 2, "1": 1, "2": 1, "3": 0, "4": 0}
    hist = s["quality_gap"]["histogram"]
    assert len(hist["edges"]) == 21 and hist["edges"][0] == -1.0 and hist["edges"][-1] == 1.0
    assert [i for i, c in enumerate(hist["counts"]) if c] == [6, 12, 14] and sum(hist["counts"]) == 3
    assert s["quality_gap"]["abs_mean"] == pytest.approx(1.05 / 3)
    assert s["similarity"] == pytest.approx({"min": 0.6, "mean": 0.75, "median": 0.75, "max": 0.9})
    assert s["params"] == {"k": 32, "tau": 0.2, "delta": 0.05, "max_partners": 4}
    assert s["index"]["kind"] == "ivf" and s["index"]["recall"] == info.recall
    json.dumps(s)
    empty = summarize_pairs(pairs.iloc[:0], 10, rule="semantic", k=8, tau=0.2, delta=0.05, max_partners=2)
    assert empty["anchors_without_partner"] == 10 and empty["similarity"]["mean"] is None


# ---------------------------------------------------------------- bank on disk


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_bank_round_trip(tmp_path, kind):
    x = clustered(600)
    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(600)], "content_id": [f"c{i // 2}" for i in range(600)],
                         "quality": np.linspace(0, 1, 600), "is_pseudo": np.arange(600) % 4 == 0})
    info = build_index(x, kind=kind, recall_queries=100)
    pairs = mine_partners(x, meta["image_id"], meta["content_id"], meta["quality"], k=10, index=info)
    summary = summarize_pairs(pairs, 600, rule="aliasing", k=10, tau=0.2, delta=0.05, max_partners=4, index=info)
    save_bank(tmp_path / "bank", x, meta, info, pairs, summary)
    bank = load_bank(tmp_path / "bank")
    assert np.array_equal(bank.embeddings, x)
    assert list(bank.meta.columns) == ["image_id", "content_id", "quality", "is_pseudo", "row"]
    assert list(bank.meta["image_id"]) == list(meta["image_id"]) and list(bank.meta["row"]) == list(range(600))
    assert bank.meta["is_pseudo"].sum() == 150
    assert bank.summary["bank"] == {"n": 600, "dim": 32, "n_pseudo": 150, "n_labelled": 450}
    assert bank.summary["n_pairs"] == len(pairs)
    for a, b in zip(search(bank.index, x[:50], 10), search(info, x[:50], 10)):
        assert np.array_equal(a, b)
    loaded = load_pairs(tmp_path / "bank")
    pd.testing.assert_frame_equal(loaded, pairs, check_dtype=False)
    by_anchor = partners_by_anchor(loaded)
    first = pairs["anchor_id"].iloc[0]
    assert by_anchor[first] == list(pairs[pairs["anchor_id"] == first].sort_values("rank")["partner_id"])
    assert sum(map(len, by_anchor.values())) == len(pairs)


def test_index_and_mine_in_one_call(tmp_path):
    x = clustered(400)
    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(400)], "content_id": [f"i{i}" for i in range(400)],
                         "quality": np.random.default_rng(0).uniform(0, 1, 400), "is_pseudo": False})
    summary = index_and_mine(tmp_path, x, meta, rule="semantic", k=8, delta=0.1)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"index.faiss", "embeddings.npy", "bank.parquet", "pairs.parquet", "summary.json"}
    assert summary["rule"] == "semantic" and summary["index"]["kind"] == "exact"
    assert summary["bank"] == {"n": 400, "dim": 32, "n_pseudo": 0, "n_labelled": 400}
    assert json.loads((tmp_path / "summary.json").read_text())["n_pairs"] == len(load_pairs(tmp_path))


def test_load_pairs_errors(tmp_path):
    x, ids, content, _ = random_bank(60, 8)
    quality = np.full(60, 0.5)
    pairs = mine_partners(x, ids, content, quality, rule="aliasing", tau=0.3)
    assert pairs.empty
    meta = pd.DataFrame({"image_id": ids, "content_id": content, "quality": quality, "is_pseudo": False})
    summary = summarize_pairs(pairs, 60, rule="aliasing", k=32, tau=0.3, delta=0.05, max_partners=4)
    save_bank(tmp_path, x, meta, build_index(x), pairs, summary)
    with pytest.raises(DataError, match="is empty: no anchor got a noise partner.*rule 'aliasing'.*'tau': 0.3"):
        load_pairs(tmp_path / "pairs.parquet")
    with pytest.raises(DataError, match="does not exist: run `qfm build-bank` first"):
        load_pairs(tmp_path / "nowhere")
    pairs_path = tmp_path / "other.parquet"
    pd.DataFrame({"anchor_id": ["a"], "partner_id": ["b"]}).to_parquet(pairs_path)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['similarity'"):
        load_pairs(pairs_path)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_pairs(tmp_path / "broken.parquet")


def test_save_bank_checks_its_inputs(tmp_path):
    x, ids, content, quality = random_bank(30, 8)
    meta = pd.DataFrame({"image_id": ids, "content_id": content, "quality": quality})
    info = build_index(x)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['is_pseudo'\]"):
        save_bank(tmp_path, x, meta, info, pd.DataFrame(columns=PAIR_COLUMNS), {})
    meta["is_pseudo"] = False
    with pytest.raises(DataError, match="29 rows but there are 30 embeddings"):
        save_bank(tmp_path, x, meta.iloc[:29], info, pd.DataFrame(columns=PAIR_COLUMNS), {})
