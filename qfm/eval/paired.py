"""Paired comparisons of two models on the same splits: is A better than B, by how much, how sure?

With 80 test images a split's SRCC moves by about +-0.05 on its own, so two medians side by side say
little. What a comparison rests on here are the per-split differences d_i = A_i - B_i on the *same*
splits:

- their mean and median, wins / losses / ties;
- a 95% interval of the mean difference two ways: the percentile bootstrap over splits (resampling the
  splits) and Student's t-interval (mean +- t * sd / sqrt(n));
- the two-sided Wilcoxon signed-rank p-value (exact for small n; with 5 splits it cannot go below 0.0625,
  with 10 below 0.002);
- the pooled per-image paired bootstrap: every split's test images resampled with replacement (the same
  draw for A and B), the metric recomputed, the differences averaged over splits. It measures how much the
  verdict depends on which test images were drawn, given these trained models, not on training noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from qfm.errors import ConfigError

CONFIDENCE = 0.95


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.quantile(samples, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return [float(lo), float(hi)]


def paired_differences(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Statistics of d = a - b over paired splits (see the module docstring); None where n is too small."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"paired values must be two 1-D sequences of one length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError("paired values must be finite numbers")
    d = a - b
    n = d.size
    out: dict = {"n": int(n), "differences": [float(x) for x in d],
                 "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum()),
                 "mean": float(d.mean()) if n else None, "median": float(np.median(d)) if n else None,
                 "std": float(d.std(ddof=1)) if n > 1 else None,
                 "ci_bootstrap": None, "ci_t": None, "wilcoxon_p": None}
    if n > 1:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        out["ci_bootstrap"] = _interval(means)
        half = stats.t.ppf(1 - (1 - CONFIDENCE) / 2, n - 1) * out["std"] / math.sqrt(n)
        out["ci_t"] = [out["mean"] - half, out["mean"] + half]
    if n > 0 and np.any(d != 0):
        out["wilcoxon_p"] = float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
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
    images with replacement (the same indices for a and b). Returns the observed mean difference, its 95%
    interval and the share of draws in which a is better.
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
        diff = _metric_rows(pa[idx], mos[idx], metric) - _metric_rows(pb[idx], mos[idx], metric)
        draws += np.nan_to_num(diff)
    draws /= len(splits)
    return {"metric": metric, "mean": float(np.mean(observed)), "ci": _interval(draws),
            "share_better": float((draws > 0).mean()), "n_boot": n_boot,
            "n_images": int(sum(len(s[0]) for s in splits))}
