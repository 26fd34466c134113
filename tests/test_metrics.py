"""Metrics against scipy and fixed cases, the logistic-fit calibration, aggregation, and the report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from scipy.optimize import least_squares

from qfm.errors import ConfigError, DataError
from qfm.eval.metrics import (
    METRIC_KEYS,
    aggregate,
    compute_metrics,
    fit_logistic,
    krcc,
    logistic4,
    plcc,
    plcc_logistic,
    rmse,
    srcc,
)
from qfm.eval.report import scatter_plot, training_curves_plot, write_metrics_json


def _noisy_pair(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mos = rng.uniform(0.0, 1.0, n)
    pred = 0.3 + 0.5 * mos + rng.normal(0.0, 0.15, n)
    return pred, mos


@pytest.mark.parametrize("seed", range(25))
def test_correlations_match_scipy_on_random_data(seed):
    pred, mos = _noisy_pair(seed)
    m = compute_metrics(pred, mos)
    assert m["srcc"] == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)
    assert m["krcc"] == pytest.approx(stats.kendalltau(pred, mos).statistic, abs=1e-12)
    assert m["plcc_raw"] == pytest.approx(stats.pearsonr(pred, mos).statistic, abs=1e-12)
    assert m["rmse_raw"] == pytest.approx(math.sqrt(np.mean((pred - mos) ** 2)), abs=1e-12)
    assert srcc(pred, mos) == m["srcc"] and krcc(pred, mos) == m["krcc"] and plcc(pred, mos) == m["plcc_raw"]
    assert m["n"] == 60 and m["logistic_fit_ok"] is True and m["logistic_fit_error"] is None
    # the fitted mapping is least squares over a family that contains (near-)linear maps: it cannot be worse
    assert m["plcc_logistic"] >= m["plcc_raw"] - 1e-3
    fitted = logistic4(pred, **m["logistic_params"])
    assert m["plcc_logistic"] == pytest.approx(stats.pearsonr(fitted, mos).statistic, abs=1e-12)
    assert m["rmse_logistic"] == pytest.approx(math.sqrt(np.mean((fitted - mos) ** 2)), abs=1e-12)
    assert m["rmse_logistic"] < m["rmse_raw"]
    json.dumps(m, allow_nan=False)  # JSON-ready, no NaN


def test_perfect_positive_relation():
    mos = np.linspace(0.05, 0.95, 30)
    m = compute_metrics(2.0 * mos + 1.0, mos)
    assert m["srcc"] == pytest.approx(1.0) and m["krcc"] == pytest.approx(1.0)
    assert m["plcc_raw"] == pytest.approx(1.0)
    assert m["plcc_logistic"] == pytest.approx(1.0, abs=1e-6)
    assert m["rmse_logistic"] == pytest.approx(0.0, abs=1e-3)


def test_perfect_negative_relation_keeps_its_sign():
    mos = np.linspace(0.05, 0.95, 30)
    m = compute_metrics(5.0 - 3.0 * mos, mos)
    assert m["srcc"] == pytest.approx(-1.0) and m["krcc"] == pytest.approx(-1.0)
    assert m["plcc_raw"] == pytest.approx(-1.0)
    assert m["logistic_params"]["b1"] < m["logistic_params"]["b2"]  # a falling curve
    assert m["plcc_logistic"] == pytest.approx(-1.0, abs=1e-6)
    assert plcc_logistic(5.0 - 3.0 * mos, mos) == pytest.approx(-1.0, abs=1e-6)


def test_ties_follow_scipy():
    pred = np.array([1, 2, 2, 3, 3, 3, 4, 5, 5, 6], dtype=float)
    mos = np.array([0.1, 0.3, 0.2, 0.4, 0.4, 0.5, 0.5, 0.7, 0.9, 0.8])
    assert srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos).statistic, abs=1e-12)
    assert krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos, variant="b").statistic, abs=1e-12)
    # tie handling matters here: tau-a (no tie correction) differs from tau-b
    n = len(pred)
    concordance = sum(np.sign(pred[i] - pred[j]) * np.sign(mos[i] - mos[j])
                      for i in range(n) for j in range(i + 1, n))
    tau_a = concordance / (n * (n - 1) / 2)
    assert abs(krcc(pred, mos) - tau_a) > 0.01


def test_monotone_nonlinear_relation():
    x = np.linspace(-4.0, 4.0, 50)
    mos = logistic4(x, 0.9, 0.1, 0.5, 0.6)
    m = compute_metrics(x, mos)
    assert m["srcc"] == pytest.approx(1.0) and m["krcc"] == pytest.approx(1.0)
    assert m["plcc_raw"] < 0.97
    assert m["plcc_logistic"] > m["plcc_raw"]
    assert m["plcc_logistic"] == pytest.approx(1.0, abs=1e-9)


def test_logistic_fit_calibration():
    """A fixed noisy case: the fit must land where an independent optimiser (TRF, other start) lands."""
    x = np.linspace(-3.0, 3.0, 41)
    true = (0.85, 0.12, 0.4, 0.7)
    mos = logistic4(x, *true) + 0.03 * np.sin(7.0 * x)
    fit = fit_logistic(x, mos)
    assert fit.ok

    def residual(b):
        return (b[0] - b[1]) / (1.0 + np.exp(-(x - b[2]) / abs(b[3]))) + b[1] - mos

    ref = least_squares(residual, x0=[1.0, 0.0, 0.0, 1.0], method="trf", xtol=1e-14, ftol=1e-14, gtol=1e-14).x
    got = [fit.params[k] for k in ("b1", "b2", "b3", "b4")]
    assert got[:3] == pytest.approx(ref[:3], abs=1e-5)
    assert abs(got[3]) == pytest.approx(abs(ref[3]), abs=1e-5)
    yhat = residual(ref) + mos
    m = compute_metrics(x, mos)
    assert m["plcc_logistic"] == pytest.approx(stats.pearsonr(yhat, mos).statistic, abs=1e-8)
    assert m["rmse_logistic"] == pytest.approx(math.sqrt(np.mean((yhat - mos) ** 2)), abs=1e-8)
    # pinned numbers for this case: near the generating curve, residual ~ the sine's RMS 0.03 / sqrt(2)
    assert got == pytest.approx([0.85957, 0.11426, 0.40986, 0.72669], abs=1e-4)
    assert m["plcc_logistic"] == pytest.approx(0.99692, abs=1e-5)
    assert m["rmse_logistic"] == pytest.approx(0.02127, abs=1e-5)
    assert m["rmse_logistic"] == pytest.approx(0.03 / math.sqrt(2.0), rel=0.01)


def test_failed_fit_is_recorded_not_hidden():
    pred, mos = _noisy_pair(3)
    m = compute_metrics(pred, mos, maxfev=2)
    assert m["logistic_fit_ok"] is False
    assert m["plcc_logistic"] is None and m["rmse_logistic"] is None and m["logistic_params"] is None
    assert "logistic fit failed" in m["logistic_fit_error"]
    assert m["plcc_raw"] == pytest.approx(stats.pearsonr(pred, mos).statistic)
    with pytest.raises(DataError, match="raw PLCC"):
        plcc_logistic(pred, mos, maxfev=2)
    with pytest.raises(DataError, match="raw RMSE"):
        rmse(pred, mos, logistic=True, maxfev=2)


def test_three_images_give_rank_metrics_but_no_logistic_fit():
    m = compute_metrics([1.0, 2.0, 3.0], [0.1, 0.5, 0.4])
    assert m["srcc"] == pytest.approx(0.5) and m["n"] == 3
    assert m["logistic_fit_ok"] is False and "at least 4 images" in m["logistic_fit_error"]


def test_rmse_raw_and_logistic():
    pred = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    mos = np.array([0.2, 0.3, 0.5, 0.7, 1.0])
    assert rmse(pred, mos) == pytest.approx(math.sqrt((0.01 + 0.01 + 0.0225 + 0.01 + 0.01) / 5))
    assert rmse(pred, mos, logistic=True) <= rmse(pred, mos) + 1e-12


@pytest.mark.parametrize(("pred", "mos", "message"), [
    ([0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4], "predictions are constant.*correlation undefined"),
    ([0.1, 0.2, 0.3, 0.4], [0.7, 0.7, 0.7, 0.7], "MOS are constant"),
    ([0.1, float("nan"), 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], "NaN/inf.*index 1"),
    ([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, float("inf"), 0.4], "MOS contain 1 NaN/inf"),
    ([0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4], "differ in length \\(3 vs 4\\)"),
    ([0.1, 0.2], [0.1, 0.2], "at least 3"),
    ([[0.1, 0.2], [0.3, 0.4]], [0.1, 0.2], "1-D"),
    (["a", "b", "c"], [0.1, 0.2, 0.3], "must be numbers"),
])
def test_bad_input_is_a_clear_error(pred, mos, message):
    for fn in (srcc, krcc, plcc, plcc_logistic, rmse, compute_metrics):
        with pytest.raises(DataError, match=message):
            fn(pred, mos)


def test_column_vectors_are_accepted():
    pred, mos = _noisy_pair(1)
    assert srcc(pred[:, None], mos) == pytest.approx(srcc(pred, mos))


def _split(**values) -> dict:
    return {k: values.get(k, 0.5) for k in METRIC_KEYS} | {"n": 80}


def test_aggregate_known_values():
    values = [0.8, 0.9, 0.85, 0.7]
    agg = aggregate([_split(srcc=v) for v in values])
    s = agg["srcc"]
    mean = sum(values) / 4
    sample_std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)  # ddof=1
    assert s["median"] == pytest.approx(0.825) and s["mean"] == pytest.approx(0.8125)
    assert s["std"] == pytest.approx(sample_std) and s["std"] == pytest.approx(0.0853912564, abs=1e-9)
    assert s["min"] == 0.7 and s["max"] == 0.9 and s["n_splits"] == 4 and s["n_missing"] == 0
    assert set(agg) == set(METRIC_KEYS)
    assert agg["krcc"]["std"] == pytest.approx(0.0)


def test_aggregate_odd_count_median_and_single_split():
    agg = aggregate([_split(plcc_raw=v) for v in (0.3, 0.9, 0.6)])
    assert agg["plcc_raw"]["median"] == 0.6 and agg["plcc_raw"]["mean"] == pytest.approx(0.6)
    assert agg["plcc_raw"]["std"] == pytest.approx(0.3)
    one = aggregate([_split(srcc=0.7)])
    assert one["srcc"]["median"] == 0.7 and one["srcc"]["std"] is None and one["srcc"]["n_splits"] == 1


def test_aggregate_counts_failed_fits():
    splits = [_split(plcc_logistic=0.9), _split(plcc_logistic=None), _split(plcc_logistic=0.8)]
    agg = aggregate(splits)
    assert agg["plcc_logistic"]["n_splits"] == 2 and agg["plcc_logistic"]["n_missing"] == 1
    assert agg["plcc_logistic"]["mean"] == pytest.approx(0.85)
    assert agg["srcc"]["n_splits"] == 3


def test_aggregate_rejects_bad_input():
    with pytest.raises(ConfigError, match="empty"):
        aggregate([])
    with pytest.raises(ConfigError, match="split 1.*'srcc'"):
        aggregate([_split(), {"krcc": 0.5}])
    with pytest.raises(DataError, match="split 0's 'srcc' is nan"):
        aggregate([_split(srcc=float("nan"))])


def test_aggregate_on_real_compute_metrics():
    splits = [compute_metrics(*_noisy_pair(seed)) for seed in range(4)]
    agg = aggregate(splits)
    srccs = [s["srcc"] for s in splits]
    assert agg["srcc"]["median"] == pytest.approx(float(np.median(srccs)))
    assert agg["srcc"]["std"] == pytest.approx(float(np.std(srccs, ddof=1)))


# ----------------------------------------------------------------------------------------------- reports

def test_write_metrics_json_round_trip(tmp_path):
    pred, mos = _noisy_pair(0)
    metrics = compute_metrics(pred, mos)
    path = write_metrics_json(tmp_path / "out" / "metrics.json", metrics,
                              {"dataset": "demo", "split": np.int64(3), "scores": np.array([0.1, 0.2])})
    data = json.loads(path.read_text())
    assert data["metrics"]["srcc"] == pytest.approx(metrics["srcc"])
    assert data["split"] == 3 and data["scores"] == [0.1, 0.2] and data["dataset"] == "demo"
    assert not list(tmp_path.glob("out/*.tmp"))


def test_write_metrics_json_rejects_nan_and_key_clash(tmp_path):
    with pytest.raises(ConfigError, match="metrics.srcc is nan"):
        write_metrics_json(tmp_path / "m.json", {"srcc": float("nan")})
    with pytest.raises(ConfigError, match="'metrics'"):
        write_metrics_json(tmp_path / "m.json", {"srcc": 0.5}, {"metrics": 1})
    assert not (tmp_path / "m.json").exists()


def _assert_png(path, min_bytes=8000):
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(raw) > min_bytes
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L"))
    assert arr.std() > 5  # something was drawn
    return arr.shape


def test_scatter_plot_writes_png(tmp_path):
    pred, mos = _noisy_pair(2, n=120)
    path = scatter_plot(tmp_path / "plots" / "scatter.png", pred, mos, title="demo, split 0")
    assert _assert_png(path) == (500, 600)


def test_scatter_plot_with_a_failed_fit(tmp_path):
    pred, mos = _noisy_pair(2)
    metrics = compute_metrics(pred, mos, maxfev=2)
    _assert_png(scatter_plot(tmp_path / "scatter.png", pred, mos, metrics))
    with pytest.raises(ConfigError, match=r"\.png"):
        scatter_plot(tmp_path / "scatter.jpg", pred, mos, metrics)


def test_training_curves_plot(tmp_path):
    history = [{"epoch": e, "train_loss": 0.2 / e, "val_loss": 0.25 / e, "val_srcc": 0.5 + 0.05 * e}
               for e in range(1, 8)]
    history[3]["val_srcc"] = None
    assert _assert_png(training_curves_plot(tmp_path / "curves.png", history)) == (400, 1000)
    with pytest.raises(ConfigError, match="empty"):
        training_curves_plot(tmp_path / "c.png", [])
    with pytest.raises(ConfigError, match="first epoch's keys are \\['lr'\\]"):
        training_curves_plot(tmp_path / "c.png", [{"lr": 0.1}])
