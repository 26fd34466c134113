"""Named pause points, so a fault test can SIGKILL a process at an exact place (mid-epoch, mid-checkpoint-write).

Set ``QFM_PAUSE_AT=NAME`` (or ``NAME#N`` for the N-th time the point is reached) and ``QFM_PAUSE_MARKER=FILE``:
when the process reaches the point it writes FILE (its pid and the point) and sleeps until it is killed.
Unset, a pause point costs one environment lookup. Points: ``step:G`` (after optimiser step G, counted from 0
over the whole run), ``write:NAME:tmp-written`` and ``write:NAME:renamed`` (inside a checkpoint write),
``upload:NAME`` (after a run folder's commit file NAME reached S3). Under torchrun ``QFM_PAUSE_RANK=R`` pauses
rank R only (the others then wait for it at the next gradient exchange).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

PAUSE_AT = "QFM_PAUSE_AT"
PAUSE_MARKER = "QFM_PAUSE_MARKER"
PAUSE_RANK = "QFM_PAUSE_RANK"  # under torchrun: only this rank pauses (default: every rank)
_reached: Counter[str] = Counter()


def pause_point(name: str) -> None:
    """Sleep forever here if QFM_PAUSE_AT names this point (and this is its N-th visit); otherwise return."""
    target = os.environ.get(PAUSE_AT)
    if not target:
        return
    wanted, _, nth = target.partition("#")
    if wanted != name or os.environ.get(PAUSE_RANK, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    _reached[name] += 1
    if _reached[name] != int(nth or 1):
        return
    marker = os.environ.get(PAUSE_MARKER)
    if marker:  # written whole, then renamed: a watcher never sees the marker half-written
        partial = Path(f"{marker}.partial")
        partial.write_text(f"{os.getpid()} {name}\n")
        partial.replace(marker)
    while True:
        time.sleep(60)
