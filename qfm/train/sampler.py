"""Batch samplers whose order depends only on (seed, epoch), so a resumed run sees the same batches.

PairBatches puts each anchor and one of its SNM partners in the same batch; both are trained on, so the
partner's forward pass is not wasted and QCC costs one more decoder pass, not one more encoder pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from qfm.errors import ConfigError


class ShuffledBatches:
    """Every index once per epoch in a (seed, epoch)-seeded order, cut into batches (last partial dropped)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = True) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.drop_last, self.epoch = n, batch_size, seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def _cut(self, order: Sequence[int]) -> list[list[int]]:
        batches = [list(map(int, order[i:i + self.batch_size])) for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._cut(self._order()))

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


class PairBatches(ShuffledBatches):
    """Like ShuffledBatches, but an anchor's partner (a dataset index) follows it in the same batch.

    Each index still appears once per epoch: walking the shuffled order, an unused anchor takes one of its
    unused partners right after it: one chosen at random (``resample``: a new draw every epoch) or the first
    in the partner list's order (its nearest in rank). Anchors without an unused partner train alone.
    """

    def __init__(self, n: int, batch_size: int, partners: Mapping[int, Sequence[int]], seed: int = 0,
                 drop_last: bool = True, resample: bool = True) -> None:
        if batch_size < 2:
            raise ConfigError(f"pair batches need batch_size >= 2 to hold an anchor and its partner, got {batch_size}")
        super().__init__(n, batch_size, seed, drop_last)
        self.resample = resample
        self.partners = {int(a): [int(p) for p in ps if 0 <= int(p) < n and int(p) != int(a)]
                         for a, ps in partners.items()}

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        used = np.zeros(self.n, dtype=bool)
        order: list[int] = []
        for anchor in rng.permutation(self.n):
            if used[anchor]:
                continue
            used[anchor] = True
            free = [p for p in self.partners.get(int(anchor), ()) if not used[p]]
            # keep a pair inside one batch: if only one slot is left, the anchor starts the next batch alone
            if free and len(order) % self.batch_size != self.batch_size - 1:
                partner = free[rng.integers(len(free))] if self.resample else free[0]
                used[partner] = True
                order += [int(anchor), int(partner)]
            else:
                order.append(int(anchor))
        return np.array(order, dtype=np.int64)


def pairs_in_batch(batch_index: Sequence[int], partners: Mapping[int, Sequence[int]]) -> list[tuple[int, int]]:
    """(anchor position, partner position) within a batch: each anchor paired with the item right after it
    when that item is one of its partners (the layout PairBatches produces)."""
    out = []
    position = 0
    while position < len(batch_index) - 1:
        anchor, nxt = int(batch_index[position]), int(batch_index[position + 1])
        if nxt in partners.get(anchor, ()):
            out.append((position, position + 1))
            position += 2
        else:
            position += 1
    return out
