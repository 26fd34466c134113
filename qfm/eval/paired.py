"""Paired comparisons of two models on the same splits: is A better than B, by how much, how sure?

With 80 test images a split's SRCC moves by about +-0.05 on its own, so two medians side by side say
little. What a comparison rests on here are the per-split differences d_i = A_i - B_i on the *same*
splits:

- their mean and median, wins / losses / ties;
- the headline 95% interval of the mean difference, the corrected resampled t-interval (Nadeau and Bengio,
  2003): mean +- t_{n-1} * sqrt((1/n + n_test/n_train) * s^2). Resampled splits share most of their
  training images, so the per-split differences are positively correlated and s^2 / n underestimates the
  variance of their mean; the n_test/n_train term is the correction for that overlap. Beside it, for
  reference only, Student's plain t-interval (mean +- t * s / sqrt(n), which assumes independent splits
  and is too narrow for resampled ones) and the percentile bootstrap over splits (descriptive below 10
  splits: with 5 it covers about 83% of the time even for independent splits);
- the two-sided Wilcoxon signed-rank p-value, exact on the non-zero differences (scipy's exact null
  distribution; zeros dropped and counted; ties among |d| get mid-ranks). With 5 non-zero differences it
  cannot go below 0.0625, with 10 below 0.002;
- the pooled per-image paired bootstrap: every split's test images resampled with replacement (the same
  draw for A and B), the metric recomputed, the differences averaged over splits. It measures how much the
  verdict depends on which test images were drawn, given these trained models, not on training noise.
  A draw in which any split's resample has constant predictions or scores (no correlation defined) is
  dropped and counted, never scored as a zero difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import stats

from qfm.errors import ConfigError

CONFIDENCE = 0.95
#: The headline interval's name, as study.md, the study report's metrics and the READMEs quote it.
HEADLINE = "corrected resampled t, 95%"
#: Below this many splits the bootstrap over splits is descriptive only (it under-covers).
BOOTSTRAP_MIN_SPLITS = 10


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.quantile(samples, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return [float(lo), float(hi)]


@lru_cache(maxsize=256)
def _t_quantile(n: int) -> float:
    return float(stats.t.ppf(1 - (1 - CONFIDENCE) / 2, n - 1))


def t_interval(d: Sequence[float]) -> list[float] | None:
    """Student's plain t-interval of the mean (independent samples); None below 2 values."""
    d = np.asarray(d, dtype=float)
    if d.size < 2:
        return None
    half = _t_quantile(d.size) * d.std(ddof=1) / math.sqrt(d.size)
    return [float(d.mean() - half), float(d.mean() + half)]


def corrected_t_interval(d: Sequence[float], test_train_ratio: float) -> list[float] | None:
    """The corrected resampled t-interval (Nadeau and Bengio, 2003) of the mean of per-split differences:
    mean +- t_{n-1} * sqrt((1/n + n_test/n_train) * s^2); None below 2 values.

    ``test_train_ratio`` is n_test / n_train of the splits: the images each model was tested on over the
    images it was fitted on. It stands for rho / (1 - rho), rho the correlation between two splits'
    differences that their shared training images cause.
    """
    if not (isinstance(test_train_ratio, (int, float)) and math.isfinite(test_train_ratio) and test_train_ratio > 0):
        raise ConfigError(f"test_train_ratio must be a positive number (n_test / n_train), got {test_train_ratio!r}")
    d = np.asarray(d, dtype=float)
    if d.size < 2:
        return None
    half = _t_quantile(d.size) * math.sqrt((1 / d.size + test_train_ratio) * d.var(ddof=1))
    return [float(d.mean() - half), float(d.mean() + half)]


def wilcoxon_exact(d: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test, exact on the non-zero differences: p (None when every
    difference is zero), the number of zeros dropped and the number of differences tested."""
    d = np.asarray(d, dtype=float)
    nonzero = d[d != 0]
    p = float(stats.wilcoxon(nonzero, alternative="two-sided", method="exact").pvalue) if nonzero.size else None
    return {"p": p, "zeros": int(d.size - nonzero.size), "n": int(nonzero.size)}


def paired_differences(a: Sequence[float], b: Sequence[float], *, test_train_ratio: float | None = None,
                       n_boot: int = 10_000, seed: int = 0) -> dict:
    """Statistics of d = a - b over paired splits (see the module docstring); None where n is too small.

    ``test_train_ratio`` (n_test / n_train of the splits) gives the headline ``ci_corrected``; without it
    that interval is None (the part sizes are unknown) and only the plain t and the bootstrap are given.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"paired values must be two 1-D sequences of one length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError("paired values must be finite numbers")
    d = a - b
    n = d.size
    wilcoxon = wilcoxon_exact(d) if n else {"p": None, "zeros": 0, "n": 0}
    out: dict = {"n": int(n), "differences": [float(x) for x in d],
                 "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum()),
                 "mean": float(d.mean()) if n else None, "median": float(np.median(d)) if n else None,
                 "std": float(d.std(ddof=1)) if n > 1 else None,
                 "test_train_ratio": None if test_train_ratio is None else float(test_train_ratio),
                 "ci_corrected": None if test_train_ratio is None else corrected_t_interval(d, test_train_ratio),
                 "ci_t": t_interval(d), "ci_bootstrap": None, "bootstrap_descriptive": n < BOOTSTRAP_MIN_SPLITS,
                 "wilcoxon_p": wilcoxon["p"], "wilcoxon_zeros": wilcoxon["zeros"], "wilcoxon_n": wilcoxon["n"]}
    if n > 1:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        out["ci_bootstrap"] = _interval(means)
    return out


def _rank_rows(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(axis=-1) / denom


def _metric_rows(pred: np.ndarray, mos: np.ndarray, metric: str) -> np.ndarray:
    if metric == "srcc":
        return _pearson_rows(_rank_rows(pred), _rank_rows(mos))
    if metric == "plcc_raw":
        return _pearson_rows(pred, mos)
    raise ConfigError(f"the per-image bootstrap computes srcc or plcc_raw, not '{metric}'")


def image_bootstrap(splits: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], metric: str = "srcc", *,
                    n_boot: int = 2000, seed: int = 0) -> dict:
    """Pooled per-image paired bootstrap of metric(a) - metric(b), averaged over splits.

    ``splits``: per split (mos, pred_a, pred_b) over the same test images. Each draw resamples every split's
    images with replacement (the same indices for a and b). A draw in which any split's resample leaves the
    metric undefined (constant predictions or scores) is dropped, not counted as a zero difference; the
    number dropped is ``n_degenerate``. Returns the observed mean difference, its 95% interval and the share
    of kept draws in which a is better (interval and share None when every draw is degenerate).
    """
    if not splits:
        raise ConfigError("the per-image bootstrap needs at least one split")
    rng = np.random.default_rng(seed)
    observed, draws = [], np.zeros(n_boot)
    for mos, pa, pb in splits:
        mos, pa, pb = (np.asarray(v, dtype=float) for v in (mos, pa, pb))
        if not mos.shape == pa.shape == pb.shape:
            raise ConfigError("each split needs mos and both predictions over the same images")
        observed.append(float(_metric_rows(pa[None], mos[None], metric)[0]
                              - _metric_rows(pb[None], mos[None], metric)[0]))
        idx = rng.integers(0, mos.size, size=(n_boot, mos.size))
        draws += _metric_rows(pa[idx], mos[idx], metric) - _metric_rows(pb[idx], mos[idx], metric)  # NaN stays NaN
    draws /= len(splits)
    kept = draws[np.isfinite(draws)]
    mean = float(np.mean(observed))
    return {"metric": metric, "mean": mean if math.isfinite(mean) else None,
            "ci": _interval(kept) if kept.size else None,
            "share_better": float((kept > 0).mean()) if kept.size else None, "n_boot": n_boot,
            "n_degenerate": int(n_boot - kept.size), "n_images": int(sum(len(s[0]) for s in splits))}
