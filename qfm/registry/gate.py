"""The promotion gate: does the challenger's validation metric beat the champion's by the margin?"""

from __future__ import annotations

from dataclasses import dataclass

from qfm.errors import ConfigError
from qfm.eval.metrics import check_metric as check_metric_name
from qfm.eval.metrics import gain as metric_gain


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def check_metric(metric: str) -> None:
    check_metric_name(metric, "promote.metric")


def decide(metric: str, margin: float, challenger: float, champion: float | None, champion_version: str | None = None,
           data_version: str = "") -> Decision:
    """Promote when there is no champion, or when the challenger beats it by more than `margin` (a higher
    value for correlations, a lower one for RMSE). The reason says which numbers were compared."""
    check_metric(metric)
    if margin < 0:
        raise ConfigError(f"promote.margin must be >= 0, got {margin}")
    if champion is None:
        return Decision(True, f"promoted: no champion yet (val {metric} {challenger:.4f})")
    gain = metric_gain(metric, challenger, champion)
    if gain is None:
        return Decision(False, f"refused: val {metric} of the challenger ({challenger}) or of champion "
                               f"v{champion_version} ({champion}) could not be computed; champion stays")
    numbers = (f"val {metric} {challenger:.4f} vs champion v{champion_version}'s {champion:.4f} "
               f"on data version {data_version}")
    if gain > margin:
        return Decision(True, f"promoted: {numbers}, better by {gain:.4f} > margin {margin}")
    return Decision(False, f"refused: {numbers}, {'better' if gain > 0 else 'not better'} by {gain:.4f}, "
                           f"needs > margin {margin}; champion stays v{champion_version}")
