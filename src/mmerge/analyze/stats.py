"""Additive statistics of task vectors, one tensor at a time, with numpy.

Everything a report needs is a sum over entries (a Gram matrix, counts, kept energies), so a
layer's or a whole model's statistics are the sums of its tensors', not averages of ratios.
The Gram matrix and the sign counts are exact (dot products are float32 within 64K-entry
blocks, summed in float64). What depends on top-k trimming is measured on a stratified sample
of SAMPLE entries per tensor (all entries of smaller tensors) and scaled to the tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CHUNK = 1 << 19  # entries per chunk: per-call overhead is small, the rows stay in L2/L3 cache
DOT = 1 << 16  # float32 dot products within blocks of this many entries, float64 across
SAMPLE = 1 << 17  # larger tensors measure top-k trimming on a sample of this many entries
RELEASE = 1 << 20  # entries read between calls to drop their file pages


@dataclass
class Stats:
    """Sums over the entries of one or more tensors, for one base and `n` fine-tunes.

    `gram` is the float64 Gram matrix of [base, task vector 1, ..., task vector n]; `both` and
    `conflicts` count entries changed by both fine-tunes of a pair and those of opposite sign;
    `top_*` count the same among entries both keep after top-k trimming at each density, and
    `kept` is each task vector's squared norm over the entries it keeps (these two are
    estimates from the sample on tensors larger than SAMPLE, hence float).
    """

    densities: tuple[float, ...]
    numel: int
    gram: np.ndarray  # (n + 1, n + 1) float64
    both: np.ndarray  # (n, n) int64, upper triangle
    conflicts: np.ndarray  # (n, n) int64, upper triangle
    top_both: np.ndarray  # (len(densities), n, n) float64
    top_conflicts: np.ndarray  # (len(densities), n, n) float64
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
            top_both=np.zeros((d, n, n)),
            top_conflicts=np.zeros((d, n, n)),
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


Release = Callable[[int, int], None]


def tensor_stats(
    rows: Sequence[np.ndarray], densities: Sequence[float], *, release: Release | None = None
) -> Stats:
    """Statistics of one tensor from flat `rows` = [base, fine-tune 1, ...]: `exact_sums`,
    then `add_trimmed` (see those for the arguments)."""
    st, sample = exact_sums(rows, densities, release=release)
    add_trimmed(st, sample)
    return st


def exact_sums(
    rows: Sequence[np.ndarray], densities: Sequence[float], *, release: Release | None = None
) -> tuple[Stats, np.ndarray]:
    """One pass over a tensor's `rows` = [base, fine-tune 1, ...], flat, in any float dtype
    (zero-copy views of a checkpoint's file do: each chunk is widened to float32 as it is
    read): the exact sums, and each task vector at the sampled entries, shape (n, entries).

    The sums are taken one CHUNK at a time while it is in cache: the Gram matrix's upper
    triangle, changed and opposite-sign counts. `release(lo, hi)` is called once entries
    [lo, hi) of every row have been read, so their file pages can be dropped.
    """
    n = len(rows) - 1
    size = rows[0].size
    st = Stats.empty(n, densities)
    st.numel = size
    picks = _picks(size, SAMPLE) if size > SAMPLE else None
    sample = np.empty((n, size if picks is None else SAMPLE), np.float32)
    width = min(CHUNK, size)
    x_all = np.empty((n + 1, width), np.float32)
    changed, negative = np.empty((n, width), bool), np.empty((n, width), bool)
    both, opposite = np.empty(width, bool), np.empty(width, bool)
    released = 0
    for start in range(0, size, CHUNK):
        stop = min(start + CHUNK, size)
        m = stop - start
        x = x_all[:, :m]
        for i, row in enumerate(rows):
            np.copyto(x[i], row[start:stop], casting="unsafe")
            if i:
                np.subtract(x[i], x[0], out=x[i])
        for i in range(n + 1):
            for j in range(i, n + 1):
                st.gram[i, j] += _dot(x[i], x[j])
        if picks is None:
            sample[:, start:stop] = x[1:]
        else:
            a, b = np.searchsorted(picks, (start, stop))
            np.take(x[1:], picks[a:b] - start, axis=1, out=sample[:, a:b], mode="wrap")
        if n > 1:
            np.not_equal(x[1:], 0, out=changed[:, :m])
            np.signbit(x[1:], out=negative[:, :m])
        for i in range(n):
            for j in range(i + 1, n):
                np.logical_and(changed[i, :m], changed[j, :m], out=both[:m])
                np.not_equal(negative[i, :m], negative[j, :m], out=opposite[:m])
                opposite[:m] &= both[:m]
                st.both[i, j] += np.count_nonzero(both[:m])
                st.conflicts[i, j] += np.count_nonzero(opposite[:m])
        if release is not None and (stop - released >= RELEASE or stop == size):
            release(released, stop)
            released = stop
    st.gram = np.triu(st.gram) + np.triu(st.gram, 1).T
    return st, sample


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum(a * b) for flat float32 arrays: float32 within DOT-entry blocks (one batched BLAS
    call), float64 across them, so the rounding error does not grow with the chunk."""
    full = a.size - a.size % DOT
    total = 0.0
    if full:
        blocks = np.matmul(a[:full].reshape(-1, 1, DOT), b[:full].reshape(-1, DOT, 1))
        total = float(blocks.sum(dtype=np.float64))
    if full < a.size:
        total += float(np.dot(a[full:], b[full:]))
    return total


def _select(values: np.ndarray, kths: Sequence[int]) -> tuple[np.ndarray, dict[int, float]]:
    """`values` partitioned so that each kth splits them into the kth smallest and the rest
    (as np.partition does), and the kth smallest value for each kth. Each partition after
    the first only reorders the part above the one before: half the work for three kths."""
    out = values.copy()
    nth = {}
    lo = 0
    for kth in sorted(set(kths)):
        out[lo:].partition(kth - lo)
        nth[kth] = out[kth]
        lo = kth
    return out, nth


def add_trimmed(st: Stats, sample: np.ndarray) -> None:
    """Fill `st.kept` and `st.top_*` from the task vectors' `sample` (from `exact_sums`):
    thresholds are the sample's k-th largest magnitudes, the kept share of the squared norm is
    the sample's (times the exact squared norm), and counts are scaled to the whole tensor."""
    n, size = sample.shape
    if size == 0:
        return
    kths = [size - top_k(size, d) for d in st.densities]
    mags = np.abs(sample)
    limits = np.empty((n, len(kths)), np.float32)
    for i in range(n):
        top, nth = _select(mags[i], kths)  # entries from kth on are the top ones
        energy = np.square(top, dtype=np.float64)
        total = energy.sum()
        for k, kth in enumerate(kths):
            t = nth[kth]
            limits[i, k] = t
            # trimming keeps |d| >= t: the top entries and any ties with t below them
            ties = np.count_nonzero(top[:kth] == t) if t > 0 else 0
            if total > 0:
                kept = energy[kth:].sum() + ties * float(t) ** 2
                st.kept[k, i] = kept / total * st.gram[i + 1, i + 1]
    if n < 2:
        return
    # never keep a zero: a threshold of 0 becomes the smallest positive float32
    limits = np.maximum(limits, np.finfo(np.float32).smallest_subnormal)
    kept = mags[:, None, :] >= limits[:, :, None]
    negative = np.signbit(sample)
    scale = st.numel / size
    for i in range(n):
        for j in range(i + 1, n):
            opposite = negative[i] != negative[j]
            for k in range(len(kths)):
                pair = kept[i, k] & kept[j, k]
                st.top_both[k, i, j] = np.count_nonzero(pair) * scale
                st.top_conflicts[k, i, j] = np.count_nonzero(pair & opposite) * scale
