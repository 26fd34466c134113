"""IQA metrics on plain arrays: SRCC, KRCC, PLCC (raw and after the 4-parameter logistic fit), RMSE.

Every function takes predictions and MOS as 1-D array-likes of the same length and returns Python floats.
Bad input (NaN/inf, length mismatch, fewer than 3 items, constant values) raises ``DataError``; no metric
ever comes back as a silent NaN.

The logistic is the VQEG 4-parameter form used across IQA (pyiqa ``fit_curve``, DBCNN, HyperIQA):

    f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2

fitted by least squares (``scipy.optimize.curve_fit``, Levenberg-Marquardt with an analytic Jacobian) from
data-derived initial guesses (pyiqa's: b1 = max(mos), b2 = min(mos), b3 = mean(pred), b4 = std(pred) / 4);
the fit is started once rising and once falling, and the lower squared error wins; b4 is reported >= 0.
The curve rises when b1 > b2 and falls when b1 < b2. Its output
always correlates positively with MOS, so ``plcc_logistic`` carries the sign of the curve's direction:
a predictor that runs against MOS gets a negative PLCC, as its SRCC does, instead of the mapping hiding it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import expit

from qfm.errors import ConfigError, DataError

MIN_ITEMS = 3
DEFAULT_MAXFEV = 100_000
#: The per-split metrics that ``aggregate`` summarises, in report order.
METRIC_KEYS = ("srcc", "krcc", "plcc_raw", "plcc_logistic", "rmse_raw", "rmse_logistic")
PARAM_NAMES = ("b1", "b2", "b3", "b4")
#: Which way each metric improves (+1: higher is better, -1: lower is better); model selection and the
#: promotion gate both read it.
METRIC_DIRECTION = {"srcc": 1, "krcc": 1, "plcc_raw": 1, "plcc_logistic": 1, "rmse_raw": -1, "rmse_logistic": -1}


def check_metric(name: str, what: str) -> str:
    """The metric name, or a ConfigError naming the parameter (`what`) and the metrics it may be."""
    if name not in METRIC_DIRECTION:
        raise ConfigError(f"{what} '{name}' is not a metric; use one of {sorted(METRIC_DIRECTION)} "
                          "(rmse_*: lower is better, the others: higher)")
    return name


def gain(metric: str, new: float | None, old: float | None) -> float | None:
    """How much better `new` is than `old` on `metric` (positive: better, whichever way the metric runs);
    None when either value is missing or not finite (a metric that could not be computed)."""
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (new, old)):
        return None
    return METRIC_DIRECTION[check_metric(metric, "metric")] * (float(new) - float(old))


def check_inputs(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray,
                 what: str = "predictions") -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D float arrays, or a DataError saying what is wrong with them."""
    arrays = []
    for name, values in ((what, pred), ("MOS", mos)):
        try:
            arr = np.asarray(values, dtype=float)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{name} must be numbers: {exc}") from exc
        if arr.ndim != 1:
            arr = arr.squeeze()
            if arr.ndim != 1:
                raise DataError(f"{name} must be a 1-D array of scores, got shape {np.shape(values)}")
        arrays.append(arr)
    p, m = arrays
    if p.shape[0] != m.shape[0]:
        raise DataError(f"{what} and MOS differ in length ({p.shape[0]} vs {m.shape[0]}): "
                        "pass one prediction per scored image, in the same order")
    if p.shape[0] < MIN_ITEMS:
        raise DataError(f"need at least {MIN_ITEMS} images to compute correlation metrics, got {p.shape[0]}")
    for name, arr in ((what, p), ("MOS", m)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise DataError(f"{name} contain {bad.size} NaN/inf value(s) (first at index {int(bad[0])}): "
                            "fix or drop those images before computing metrics")
        if np.ptp(arr) == 0.0:
            raise DataError(f"{name} are constant ({arr[0]!r} for all {arr.size} images): correlation undefined")
    return p, m


def srcc(pred, mos) -> float:
    """Spearman rank correlation (ties get average ranks, as scipy.stats.spearmanr)."""
    p, m = check_inputs(pred, mos)
    return float(stats.spearmanr(p, m).statistic)


def krcc(pred, mos) -> float:
    """Kendall rank correlation, tau-b (scipy.stats.kendalltau's default, which accounts for ties)."""
    p, m = check_inputs(pred, mos)
    return float(stats.kendalltau(p, m).statistic)


def plcc(pred, mos) -> float:
    """Pearson linear correlation of the raw predictions with MOS (no fitted mapping)."""
    p, m = check_inputs(pred, mos)
    return float(stats.pearsonr(p, m).statistic)


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The VQEG 4-parameter logistic (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2, overflow-free."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (b1 - b2) * expit((np.asarray(x, dtype=float) - b3) / np.abs(b4)) + b2


@dataclass
class LogisticFit:
    """The result of fitting ``logistic4`` from predictions to MOS.

    ``ok`` is False when no start converged to a usable curve; ``error`` then says why and ``params`` and
    ``fitted`` are None.
    """

    ok: bool
    params: dict[str, float] | None = None
    fitted: np.ndarray | None = field(default=None, repr=False)
    error: str | None = None

    @property
    def increasing(self) -> bool:
        """Whether the fitted curve rises with the prediction (b1 > b2)."""
        return bool(self.ok and self.params["b1"] > self.params["b2"])


def _logistic4_jacobian(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """Analytic d logistic4 / d(b1, b2, b3, b4). Finite differences stall a parameter that starts at 0."""
    scale = np.abs(b4)
    s = expit((x - b3) / scale)
    slope = (b1 - b2) * s * (1.0 - s)
    return np.stack([s, 1.0 - s, -slope / scale, -slope * (x - b3) * np.sign(b4) / scale**2], axis=1)


def fit_logistic(pred, mos, maxfev: int = DEFAULT_MAXFEV) -> LogisticFit:
    """Fit ``logistic4`` from pred to MOS; never raises for a failed fit, it reports it in the result.

    The fit runs on standardised predictions (better conditioned for any prediction scale) with an analytic
    Jacobian; the parameters are mapped back, so ``params`` apply to the predictions as given.
    """
    p, m = check_inputs(pred, mos)
    if p.size < len(PARAM_NAMES):
        return LogisticFit(ok=False, error=f"4-parameter logistic fit failed: it needs at least "
                                           f"{len(PARAM_NAMES)} images, got {p.size}")
    mu, sd = float(np.mean(p)), float(np.std(p))
    z = (p - mu) / sd
    starts = ([m.max(), m.min(), 0.0, 0.25], [m.min(), m.max(), 0.0, 0.25])  # rising, falling (pyiqa's guess)
    best: tuple[float, np.ndarray] | None = None
    errors = []
    for p0 in starts:
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", OptimizeWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                params, _ = curve_fit(logistic4, z, m, p0=p0, jac=_logistic4_jacobian, maxfev=maxfev)
        except (RuntimeError, ValueError, FloatingPointError) as exc:
            errors.append(str(exc).strip())
            continue
        params = np.array([params[0], params[1], mu + sd * params[2], sd * abs(params[3])])
        yhat = logistic4(p, *params)
        if not (np.all(np.isfinite(params)) and np.all(np.isfinite(yhat))) or params[3] == 0.0:
            errors.append(f"fit ended at non-finite or degenerate parameters {params.tolist()}")
            continue
        if np.ptp(yhat) == 0.0:
            errors.append("fitted curve is flat over the predictions (every image maps to the same score)")
            continue
        sse = float(np.sum((yhat - m) ** 2))
        if best is None or sse < best[0]:
            best = (sse, params)
    if best is None:
        return LogisticFit(ok=False, error="4-parameter logistic fit failed: " + "; ".join(errors))
    params = best[1]
    return LogisticFit(ok=True, params={k: float(v) for k, v in zip(PARAM_NAMES, params)},
                       fitted=logistic4(p, *params))


def _signed_plcc(fit: LogisticFit, mos: np.ndarray) -> float:
    r = float(stats.pearsonr(fit.fitted, mos).statistic)
    return r if fit.increasing else -r


def plcc_logistic(pred, mos, maxfev: int = DEFAULT_MAXFEV) -> float:
    """PLCC after the 4-parameter logistic fit (sign = the fitted curve's direction); DataError if it fails."""
    p, m = check_inputs(pred, mos)
    fit = fit_logistic(p, m, maxfev)
    if not fit.ok:
        raise DataError(f"{fit.error}. Report the raw PLCC (plcc) instead, and say that it is raw.")
    return _signed_plcc(fit, m)


def rmse(pred, mos, logistic: bool = False, maxfev: int = DEFAULT_MAXFEV) -> float:
    """Root mean squared error against MOS: of the raw predictions (default; only meaningful when they are on
    the MOS scale) or, with ``logistic=True``, of the logistic-fitted predictions (DataError if the fit fails)."""
    p, m = check_inputs(pred, mos)
    if logistic:
        fit = fit_logistic(p, m, maxfev)
        if not fit.ok:
            raise DataError(f"{fit.error}. Report the raw RMSE instead, and say that it is raw.")
        p = fit.fitted
    return float(np.sqrt(np.mean((p - m) ** 2)))


def compute_metrics(pred, mos, maxfev: int = DEFAULT_MAXFEV) -> dict:
    """All metrics for one split as a JSON-ready dict.

    Keys: srcc, krcc, plcc_raw, plcc_logistic, rmse_raw, rmse_logistic, n, logistic_fit_ok,
    logistic_params ({b1..b4}), logistic_fit_error. When the logistic fit fails, logistic_fit_ok is False,
    plcc_logistic / rmse_logistic / logistic_params are None and logistic_fit_error says why.
    """
    p, m = check_inputs(pred, mos)
    fit = fit_logistic(p, m, maxfev)
    return {
        "srcc": float(stats.spearmanr(p, m).statistic),
        "krcc": float(stats.kendalltau(p, m).statistic),
        "plcc_raw": float(stats.pearsonr(p, m).statistic),
        "plcc_logistic": _signed_plcc(fit, m) if fit.ok else None,
        "rmse_raw": float(np.sqrt(np.mean((p - m) ** 2))),
        "rmse_logistic": float(np.sqrt(np.mean((fit.fitted - m) ** 2))) if fit.ok else None,
        "n": int(p.size),
        "logistic_fit_ok": fit.ok,
        "logistic_params": fit.params,
        "logistic_fit_error": fit.error,
    }


def aggregate(split_metrics: Sequence[dict], keys: Sequence[str] = METRIC_KEYS) -> dict:
    """Summarise per-split metric dicts (the ten-split protocol) metric by metric.

    Returns ``{metric: {median, mean, std, min, max, n_splits, n_missing}}``. ``std`` is the sample standard
    deviation (ddof=1), None for a single split. A split whose value is None (a failed logistic fit) is left
    out of that metric's numbers and counted in ``n_missing``; ``n_splits`` is how many values were used.
    """
    if not split_metrics:
        raise ConfigError("aggregate needs at least one split's metrics, got an empty list")
    out: dict[str, dict] = {}
    for key in keys:
        values = []
        for i, split in enumerate(split_metrics):
            if key not in split:
                raise ConfigError(f"split {i}'s metrics have no '{key}' (keys: {sorted(split)}); "
                                  "pass dicts made by compute_metrics")
            value = split[key]
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise DataError(f"split {i}'s '{key}' is {value!r}, not a finite number")
            values.append(float(value))
        arr = np.asarray(values, dtype=float)
        has = arr.size > 0
        out[key] = {
            "median": float(np.median(arr)) if has else None,
            "mean": float(np.mean(arr)) if has else None,
            "std": float(np.std(arr, ddof=1)) if arr.size > 1 else None,
            "min": float(np.min(arr)) if has else None,
            "max": float(np.max(arr)) if has else None,
            "n_splits": int(arr.size),
            "n_missing": len(split_metrics) - int(arr.size),
        }
    return out
