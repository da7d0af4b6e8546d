"""Additive statistics of task vectors, one tensor at a time, with numpy.

Everything a report needs is a sum over entries (a Gram matrix, counts, kept energies), so a
layer's or a whole model's statistics are the sums of its tensors' and are exact, not averages
of ratios. Dot products are float32 within 64K-entry chunks, summed in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CHUNK = 1 << 16  # entries per chunk: float32 dots within a chunk, float64 across (rel. ~1e-8)
SAMPLE = 1 << 17  # larger tensors find top-k thresholds on a sample of this many entries


@dataclass
class Stats:
    """Sums over the entries of one or more tensors, for one base and `n` fine-tunes.

    `gram` is the float64 Gram matrix of [base, task vector 1, ..., task vector n]; `both` and
    `conflicts` count entries changed by both fine-tunes of a pair and those of opposite sign;
    `top_*` count the same among entries both keep after top-k trimming at each density, and
    `kept` is each task vector's squared norm over the entries it keeps.
    """

    densities: tuple[float, ...]
    numel: int
    gram: np.ndarray  # (n + 1, n + 1) float64
    both: np.ndarray  # (n, n) int64, upper triangle
    conflicts: np.ndarray  # (n, n) int64, upper triangle
    top_both: np.ndarray  # (len(densities), n, n) int64
    top_conflicts: np.ndarray  # (len(densities), n, n) int64
    kept: np.ndarray  # (len(densities), n) float64

    @classmethod
    def empty(cls, n: int, densities: Sequence[float]) -> Stats:
        """Zero statistics for `n` fine-tunes, the start of a sum."""
        d = len(densities)
        return cls(
            densities=tuple(densities),
            numel=0,
            gram=np.zeros((n + 1, n + 1)),
            both=np.zeros((n, n), np.int64),
            conflicts=np.zeros((n, n), np.int64),
            top_both=np.zeros((d, n, n), np.int64),
            top_conflicts=np.zeros((d, n, n), np.int64),
            kept=np.zeros((d, n)),
        )

    def add(self, other: Stats) -> None:
        """Add `other`'s sums into these (same fine-tunes and densities)."""
        self.numel += other.numel
        self.gram += other.gram
        self.both += other.both
        self.conflicts += other.conflicts
        self.top_both += other.top_both
        self.top_conflicts += other.top_conflicts
        self.kept += other.kept


def top_k(size: int, density: float) -> int:
    """How many entries top-k trimming keeps at `density`: ceil(density * size), at least 1."""
    return min(size, max(1, math.ceil(density * size)))


@functools.lru_cache(maxsize=8)
def _picks(size: int, count: int) -> np.ndarray:
    """`count` sorted indices into `size` entries: one at a random place in each equal span
    (fixed seed, so results repeat; cached because layers repeat shapes)."""
    jitter = np.random.default_rng(size).random(count)
    picks = np.minimum(((np.arange(count) + jitter) * (size / count)).astype(np.int64), size - 1)
    picks.flags.writeable = False
    return picks


def thresholds(delta: np.ndarray, densities: Sequence[float]) -> list[float]:
    """For each density, the k-th largest magnitude in `delta` (np.partition).

    Tensors larger than SAMPLE entries use the same quantile of a stratified sample of SAMPLE
    entries (one at a random place in each of SAMPLE equal spans), so trimming keeps the
    density's share of entries to within about 0.1%.
    """
    values = np.abs(delta[_picks(delta.size, SAMPLE)] if delta.size > SAMPLE else delta)
    kths = [values.size - top_k(values.size, d) for d in densities]
    values.partition(sorted(set(kths)))
    return [float(values[k]) for k in kths]


class _Workspace:
    """Chunk-sized scratch arrays, reused for every chunk so memory stays bounded."""

    def __init__(self, n: int, d: int, size: int):
        self.mag = np.empty((n, size), np.float32)
        self.limit = np.empty((n, d, size), np.float32)
        self.clipped = np.empty(size, np.float32)
        self.changed = np.empty((n, size), bool)
        self.negative = np.empty((n, size), bool)
        self.kept = np.empty((n, d, size), bool)
        self.both = np.empty(size, bool)
        self.opposite = np.empty(size, bool)
        self.scratch = np.empty(size, bool)


def tensor_stats(
    base: np.ndarray,
    deltas: Sequence[np.ndarray],
    densities: Sequence[float],
    *,
    parts: int = 1,
    mapper: Callable = map,
) -> Stats:
    """Statistics of one tensor: flat float32 `base` and task vectors `deltas` (ft - base).

    The tensor is cut into up to `parts` spans of whole chunks, measured by `mapper` (e.g. a
    thread pool's map; numpy releases the GIL) and summed.
    """
    n = len(deltas)
    if base.size == 0:
        return Stats.empty(n, densities)
    limits = np.array([thresholds(d, densities) for d in deltas], np.float32).reshape(n, -1)
    rows = [base, *deltas]
    chunks = -(-base.size // CHUNK)
    step = -(-chunks // max(1, parts)) * CHUNK
    spans = [(a, min(a + step, base.size)) for a in range(0, base.size, step)]
    results = list(mapper(lambda span: _span_stats(rows, limits, densities, *span), spans))
    st, below = results[0]
    for more, more_below in results[1:]:
        st.add(more)
        below += more_below
    st.gram = np.triu(st.gram) + np.triu(st.gram, 1).T
    st.kept = np.maximum(np.diag(st.gram)[1:] - below, 0)  # rounding may dip below 0
    return st


def _span_stats(
    rows: Sequence[np.ndarray], limits: np.ndarray, densities: Sequence[float], lo: int, hi: int
) -> tuple[Stats, np.ndarray]:
    """Sums over entries [lo, hi), one CHUNK at a time while it is in cache (the Gram matrix
    upper triangle only), and each task vector's squared norm below each threshold.

    The squared norm below t is sum(min(|d|, t)^2) minus t^2 times the count at or above t,
    which avoids gathering the kept entries.
    """
    n, nd = len(rows) - 1, len(densities)
    st = Stats.empty(n, densities)
    st.numel = hi - lo
    ws = _Workspace(n, nd, min(CHUNK, hi - lo))
    ws.limit[...] = limits[:, :, None]  # np.minimum is slow with a scalar
    below = np.zeros((nd, n))
    for start in range(lo, hi, CHUNK):
        stop = min(start + CHUNK, hi)
        m = stop - start
        blocks = [row[start:stop] for row in rows]
        for i in range(n + 1):
            for j in range(i, n + 1):
                st.gram[i, j] += float(np.dot(blocks[i], blocks[j]))
        for i in range(n):
            mag = np.abs(blocks[i + 1], out=ws.mag[i, :m])
            if n > 1:
                np.greater(mag, 0, out=ws.changed[i, :m])
                np.signbit(blocks[i + 1], out=ws.negative[i, :m])
            for k in range(nd):
                t = float(limits[i, k])
                clipped = np.minimum(mag, ws.limit[i, k, :m], out=ws.clipped[:m])
                keep = (np.greater_equal if t > 0 else np.greater)(mag, t, out=ws.kept[i, k, :m])
                below[k, i] += float(np.dot(clipped, clipped)) - t * t * np.count_nonzero(keep)
        for i in range(n):
            for j in range(i + 1, n):
                both = np.logical_and(ws.changed[i, :m], ws.changed[j, :m], out=ws.both[:m])
                opposite = np.not_equal(ws.negative[i, :m], ws.negative[j, :m], out=ws.opposite[:m])
                opposite &= both
                st.both[i, j] += np.count_nonzero(both)
                st.conflicts[i, j] += np.count_nonzero(opposite)
                for k in range(nd):
                    pair = np.logical_and(ws.kept[i, k, :m], ws.kept[j, k, :m], out=ws.scratch[:m])
                    st.top_both[k, i, j] += np.count_nonzero(pair)
                    pair &= opposite
                    st.top_conflicts[k, i, j] += np.count_nonzero(pair)
    return st, below
