"""Evaluation: metrics on plain arrays (``qfm.eval.metrics``) and reports and plots (``qfm.eval.report``).

Only the metrics are imported here; ``qfm.eval.report`` imports matplotlib and is imported where used.
"""

from qfm.eval.metrics import (
    METRIC_KEYS,
    LogisticFit,
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

__all__ = ["METRIC_KEYS", "LogisticFit", "aggregate", "compute_metrics", "fit_logistic", "krcc", "logistic4",
           "plcc", "plcc_logistic", "rmse", "srcc"]
