"""qfm.eval.paired: the headline interval covers 95% on correlated resampled splits (and the plain t-interval
does not), Wilcoxon is exact on the non-zero differences, and the per-image bootstrap drops degenerate draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qfm.errors import ConfigError
from qfm.eval.paired import (
    HEADLINE,
    corrected_t_interval,
    image_bootstrap,
    paired_differences,
    t_interval,
    wilcoxon_exact,
)

# The committed clive-dev studies' parts: 80 test images over 280 labelled train images per split.
RATIO = 80 / 280
# Nadeau and Bengio's correction takes rho / (1 - rho) = n_test / n_train for the correlation rho between two
# resampled splits' differences; simulate exactly that: d_i = mu + sigma * (sqrt(rho) * shared + sqrt(1 - rho) * own_i).
RHO = RATIO / (1 + RATIO)
REPS = 2000
# The coverage of REPS seeded repetitions is a binomial proportion: its standard error at 0.95 is
# sqrt(0.95 * 0.05 / 2000) = 0.0049; the tolerance is 3 standard errors (0.015), which a correct interval
# misses by chance about 3 times in 1000.
SE = math.sqrt(0.95 * 0.05 / REPS)
TOLERANCE = 3 * SE


def _correlated_differences(n: int, mu: float, seed: int, sigma: float = 0.04) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(REPS, 1))
    own = rng.normal(size=(REPS, n))
    return mu + sigma * (math.sqrt(RHO) * shared + math.sqrt(1 - RHO) * own)


def _coverage(intervals: list[list[float]], mu: float) -> float:
    return float(np.mean([lo <= mu <= hi for lo, hi in intervals]))


@pytest.mark.parametrize("n", [5, 10])
@pytest.mark.parametrize("mu", [0.0, 0.03], ids=["no effect", "true effect 0.03"])
def test_the_headline_interval_covers_95_percent_on_correlated_splits_and_the_plain_t_does_not(n, mu):
    d = _correlated_differences(n, mu, seed=1000 * n + int(mu * 1000))
    corrected = [corrected_t_interval(row, RATIO) for row in d]
    plain = [t_interval(row) for row in d]
    covered, plain_covered = _coverage(corrected, mu), _coverage(plain, mu)
    assert abs(covered - 0.95) <= TOLERANCE, (n, mu, covered)
    # expected: the plain t covers P(|T| < t_crit / sqrt(1 + n * ratio)), 0.85 at n = 5 and 0.72 at n = 10
    assert plain_covered < 0.95 - TOLERANCE, (n, mu, plain_covered)
    assert plain_covered == pytest.approx({5: 0.85, 10: 0.72}[n], abs=0.03)


def test_paired_differences_gives_the_corrected_interval_as_its_headline():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.78, 0.03, 5), rng.normal(0.77, 0.03, 5)
    d = a - b
    out = paired_differences(a, b, test_train_ratio=RATIO)
    s2 = d.var(ddof=1)
    half = 2.7764451051977987 * math.sqrt((1 / 5 + RATIO) * s2)  # t(0.975, 4)
    assert out["ci_corrected"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert out["ci_corrected"] == pytest.approx(corrected_t_interval(d, RATIO))
    assert out["ci_t"] == pytest.approx(t_interval(d))
    assert out["test_train_ratio"] == pytest.approx(RATIO) and out["bootstrap_descriptive"] is True
    assert out["ci_corrected"][1] - out["ci_corrected"][0] > out["ci_t"][1] - out["ci_t"][0]
    assert paired_differences(rng.random(10), rng.random(10))["bootstrap_descriptive"] is False
    assert paired_differences(a, b)["ci_corrected"] is None  # part sizes unknown: no headline interval
    with pytest.raises(ConfigError, match="test_train_ratio"):
        paired_differences(a, b, test_train_ratio=0.0)
    assert HEADLINE == "corrected resampled t, 95%"


def test_wilcoxon_is_exact_on_the_non_zero_differences_and_counts_the_zeros():
    # nonzero ranks 1..5, one negative of rank 2: T- = 2, two-sided exact p = 2 * #{subsets with sum <= 2} / 32
    out = paired_differences([0.80, 0.81, 0.78, 0.83, 0.84, 0.85], [0.80, 0.80, 0.80, 0.80, 0.80, 0.80])
    assert out["wilcoxon_p"] == pytest.approx(2 * 3 / 32) and out["wilcoxon_zeros"] == 1 and out["wilcoxon_n"] == 5
    floor = wilcoxon_exact([0.0, 0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
    assert floor == {"p": pytest.approx(2 / 32), "zeros": 2, "n": 5}  # the exact floor with 5 non-zero
    assert wilcoxon_exact([0.0, 0.0, 0.0]) == {"p": None, "zeros": 3, "n": 0}


def test_image_bootstrap_drops_degenerate_draws_instead_of_scoring_them_zero():
    mos = np.array([0.2, 0.5, 0.9])  # 3 images: about 1 draw in 9 resamples one image three times
    good, bad = mos.copy(), -mos     # SRCC +1 and -1 on every draw with two distinct images
    out = image_bootstrap([(mos, good, bad)], "srcc", n_boot=900, seed=0)
    assert out["mean"] == pytest.approx(2.0)
    assert 50 <= out["n_degenerate"] <= 150  # binomial(900, 1/9): mean 100, sd 9.4
    assert out["ci"] == pytest.approx([2.0, 2.0]) and out["share_better"] == 1.0  # was [0, 2] and 0.89
    rng = np.random.default_rng(1)
    big = rng.random(80)
    both = image_bootstrap([(mos, good, bad), (big, big, big + rng.normal(0, 0.3, 80))], "srcc", n_boot=900, seed=0)
    assert both["n_degenerate"] == out["n_degenerate"]  # a draw is degenerate when any split's resample is
    assert both["n_images"] == 83 and both["ci"][0] > 0
    flat = image_bootstrap([(mos, np.ones(3), bad)], "plcc_raw", n_boot=50)
    assert flat["n_degenerate"] == 50 and flat["ci"] is None and flat["share_better"] is None and flat["mean"] is None
