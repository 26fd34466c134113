"""Evaluation outputs: the metrics JSON, the prediction-vs-MOS scatter plot and the training curves.

Plots are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch), so
they work on headless machines and from several threads.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qfm.errors import ConfigError
from qfm.eval.metrics import check_inputs, compute_metrics, logistic4

LOSS_KEYS = ("train_loss", "loss")
VAL_SRCC_KEYS = ("val_srcc", "srcc")


def _jsonable(value, where: str):
    """Plain JSON types (numpy scalars and arrays converted); NaN/inf rejected with the key that holds it."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} is {value}: a metrics file holds finite numbers only (use None for 'missing')")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(f"{where} is a {type(value).__name__}, which cannot be written to a metrics JSON file")


def write_metrics_json(path: str | Path, metrics: Mapping, extra: Mapping | None = None) -> Path:
    """Write ``{"metrics": metrics, **extra}`` as indented JSON (atomically); returns the path.

    ``extra`` holds what a number needs beside it (dataset, split, checkpoint, protocol notes); it may not
    use the key ``metrics``.
    """
    extra = dict(extra or {})
    if "metrics" in extra:
        raise ConfigError("write_metrics_json: 'extra' may not contain the key 'metrics' (it would overwrite them)")
    payload = _jsonable({"metrics": metrics, **extra}, "metrics file")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"plot path {path} must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def scatter_plot(path_png: str | Path, pred, mos, metrics: Mapping | None = None, title: str = "") -> Path:
    """Prediction vs MOS with the fitted logistic curve; the title gives SRCC and PLCC and says which PLCC.

    ``metrics`` is ``compute_metrics(pred, mos)``'s dict (computed here when None). When the logistic fit
    failed, the title shows the raw PLCC and says so, and no curve is drawn.
    """
    p, m = check_inputs(pred, mos)
    metrics = compute_metrics(p, m) if metrics is None else metrics
    missing = [k for k in ("srcc", "plcc_raw", "logistic_fit_ok") if k not in metrics]
    if missing:
        raise ConfigError(f"scatter_plot: metrics lack {missing}; pass the dict from compute_metrics")
    fig = _new_figure(6.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(p, m, s=12, alpha=0.6, edgecolors="none", label=f"images (n={p.size})")
    if metrics["logistic_fit_ok"]:
        xs = np.linspace(p.min(), p.max(), 200)
        ax.plot(xs, logistic4(xs, **metrics["logistic_params"]), color="C3", lw=2,
                label="4-parameter logistic fit")
        plcc_text = f"PLCC (logistic-fitted) {metrics['plcc_logistic']:.3f}"
    else:
        plcc_text = f"PLCC (raw; logistic fit failed) {metrics['plcc_raw']:.3f}"
    heading = f"SRCC {metrics['srcc']:.3f}  |  {plcc_text}"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    ax.set_xlabel("prediction")
    ax.set_ylabel("MOS (normalised, higher = better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path_png)


def _series(history: Sequence[Mapping], keys: Sequence[str]) -> tuple[str | None, np.ndarray]:
    for key in keys:
        if any(key in row for row in history):
            values = [row.get(key) for row in history]
            return key, np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return None, np.array([])


def training_curves_plot(path_png: str | Path, history: Sequence[Mapping]) -> Path:
    """Loss and validation SRCC per epoch, one panel each.

    ``history`` has one dict per epoch with ``epoch`` (optional; 1, 2, … otherwise), ``train_loss`` (or
    ``loss``), optional ``val_loss`` and ``val_srcc`` (or ``srcc``). A missing value (None) shows as a gap.
    """
    if not history:
        raise ConfigError("training_curves_plot: the history is empty (no epoch was recorded)")
    loss_key, loss = _series(history, LOSS_KEYS)
    srcc_key, val_srcc = _series(history, VAL_SRCC_KEYS)
    if loss_key is None and srcc_key is None:
        raise ConfigError(f"training_curves_plot: no epoch has any of {LOSS_KEYS + VAL_SRCC_KEYS}; "
                          f"the first epoch's keys are {sorted(history[0])}")
    epochs = np.array([row.get("epoch", i + 1) for i, row in enumerate(history)], dtype=float)
    _, val_loss = _series(history, ("val_loss",))
    fig = _new_figure(10.0, 4.0)
    ax_loss, ax_srcc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if loss_key is not None:
        ax_loss.plot(epochs, loss, marker="o", label=loss_key)
    if val_loss.size:
        ax_loss.plot(epochs, val_loss, marker="s", label="val_loss")
    ax_loss.set_title("loss")
    if srcc_key is not None:
        ax_srcc.plot(epochs, val_srcc, marker="o", color="C2", label=srcc_key)
    ax_srcc.set_title("validation SRCC")
    for ax in (ax_loss, ax_srcc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, path_png)


def paired_differences_plot(path_png: str | Path, study: Mapping) -> Path:
    """Per-split test SRCC differences of each row with the reference (dots), their mean (diamond) and 95%
    intervals: thick blue, the headline corrected resampled t-interval; thin grey above it, the plain
    t-interval; dashed green below it, the bootstrap over splits (descriptive below 10 splits). One line per
    row, zero marked."""
    compared = [e for e in study["rows"] if e.get("vs_reference")]
    fig = _new_figure(7.0, 1.2 + 0.6 * max(1, len(compared)))
    ax = fig.add_subplot(1, 1, 1)
    for y, entry in enumerate(reversed(compared)):
        d = entry["vs_reference"]["test_srcc"]
        if d["n"] == 0:
            continue
        ax.scatter(d["differences"], [y] * d["n"], s=14, color="0.45", zorder=3)
        for interval, width, style, color, dy in ((d.get("ci_corrected"), 4.0, "-", "tab:blue", 0.0),
                                                  (d["ci_t"], 1.2, "-", "0.25", 0.18),
                                                  (d["ci_bootstrap"], 1.2, "--", "tab:green", -0.18)):
            if interval is not None:
                ax.plot(interval, [y + dy, y + dy], color=color, linewidth=width, linestyle=style,
                        solid_capstyle="butt", zorder=2)
        ax.scatter([d["mean"]], [y], marker="D", s=36, color="tab:red", zorder=4)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(compared)), [e["row"] for e in reversed(compared)])
    ax.set_ylim(-0.7, len(compared) - 0.3)
    ax.set_xlabel(f"test SRCC minus '{study['reference']}', same splits")
    ax.set_title(f"Paired differences over {len(study['splits'])} splits: per split (dots), mean (diamond)\n95% CI: "
                 "corrected resampled t (thick, headline), plain t (thin), bootstrap (dashed)",
                 fontsize=8)
    fig.tight_layout()
    return _save(fig, path_png)
