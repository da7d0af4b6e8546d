"""Exact top-k selection by magnitude, with ties broken by flat index, on any backend.

The array API has no partial sort, so the k-th largest magnitude comes from a short native
fast path where a library has one (numpy/cupy `partition`, torch `kthvalue`/`topk`, mlx
`partition`) and from `sort` otherwise. The mask is then built with standard operations only,
so it is the same on every backend: all magnitudes above the threshold, plus the first entries
equal to it in flat order until exactly k are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmerge import backend

Array = Any

_SCAN = 1 << 20  # entries per step when counting ties
_BRACKET_MIN = 1 << 16  # below this a plain partition is as fast as bracketing
_SAMPLE = 1 << 14  # about this many sample entries bracket the k-th largest


def top_count(density: float, n: int) -> int:
    """How many of n entries a top-`density` trim keeps: max(1, int(density * n)), as mergekit."""
    if density >= 1:
        return n
    return min(n, max(1, int(density * n)))


def kth_largest(xp, a: Array, k: int) -> Array:
    """The k-th largest value (1 <= k <= n) of the flat array `a` (a 0-d array or scalar)."""
    n = a.shape[0]
    lib = backend.library_name(a)
    if lib == "numpy" and n >= _BRACKET_MIN:
        found = _bracketed_kth(a, k)
        if found is not None:
            return found
    if lib in ("numpy", "cupy"):
        scratch = a.copy()
        scratch.partition(n - k)  # in place, O(n)
        return scratch[n - k]
    if lib == "torch":
        import torch

        if a.device.type == "cpu":
            return torch.kthvalue(a, n - k + 1).values
        return torch.topk(a, k, sorted=False).values.min()
    if lib == "mlx":
        import mlx.core as mx

        return mx.partition(a, n - k)[n - k]
    return xp.sort(a)[n - k]


@dataclass(frozen=True)
class TopRule:
    """Which entries a top-k selection keeps, decided once from the whole flat array and then
    applied to any chunk of it: |x| > threshold, plus entries equal to it up to flat index
    `last_equal` (inclusive; -1 keeps none of them, `n` or more keeps all)."""

    threshold: float
    last_equal: int
    keep_all: bool = False
    keep_none: bool = False


def _bracketed_kth(a, k: int):
    """numpy fast path: the exact k-th largest of `a` from a small band around it.

    A strided sample brackets the k-th largest value between two sample values; one counting
    pass checks the bracket, and only the entries inside it are partitioned. Returns None when
    the sample's bracket misses (then the caller partitions everything).
    """
    import numpy as np

    n = a.shape[0]
    sample = np.sort(a[:: max(1, n // _SAMPLE)])
    m = sample.shape[0]
    pos = (n - k) / n * (m - 1)  # where the k-th largest falls in the ascending sample
    margin = 4 * int(m**0.5) + 16
    lo = sample[max(int(pos) - margin, 0)]
    hi = sample[min(int(pos) + margin + 1, m - 1)]
    above = int(np.count_nonzero(a > hi))
    if above >= k:
        return None
    band = a[(a >= lo) & (a <= hi)]
    rank = k - above  # the answer is the rank-th largest inside the band
    if rank > band.shape[0]:
        return None
    band.partition(band.shape[0] - rank)
    return band[band.shape[0] - rank]


def top_rule(xp, x: Array, k: int) -> TopRule:
    """The rule keeping exactly the k largest |x| of the flat array `x` (lower index wins ties).

    Holds one |x| array at a time; ties at the threshold are resolved by scanning in chunks, so
    no index-sized integer array is ever built.
    """
    n = x.shape[0]
    if k <= 0:
        return TopRule(0.0, -1, keep_none=True)
    if k >= n:
        return TopRule(0.0, n, keep_all=True)
    a = xp.abs(x)
    threshold = float(kth_largest(xp, a, k))
    above = int(xp.count_nonzero(a > threshold))
    equal_mask = a == threshold
    equal = int(xp.count_nonzero(equal_mask))
    needed = k - above
    if needed >= equal:
        return TopRule(threshold, n)
    seen = 0
    for s in range(0, n, _SCAN):
        eq = equal_mask[s : min(s + _SCAN, n)]
        count = int(xp.count_nonzero(eq))
        if seen + count >= needed:
            order = xp.cumulative_sum(xp.astype(eq, xp.int64))
            hit = xp.astype(order >= needed - seen, xp.int8)
            return TopRule(threshold, s + int(xp.argmax(hit)))
        seen += count
    raise AssertionError("unreachable: fewer equal entries than counted")


def rule_mask(xp, x: Array, rule: TopRule, start: int = 0) -> Array:
    """The rule's keep mask for `x`, the flat entries start .. start+len(x)-1 of the array."""
    a = xp.abs(x)
    if rule.keep_none:
        return a < 0
    if rule.keep_all:
        return a >= 0
    n = x.shape[0]
    if rule.last_equal >= start + n - 1:
        return a >= rule.threshold
    if rule.last_equal < start:
        return a > rule.threshold
    index = xp.arange(start, start + n, dtype=xp.int64, **_on(x))
    return (a > rule.threshold) | ((a == rule.threshold) & (index <= rule.last_equal))


def _on(x: Array) -> dict:
    device = backend.device_of(x)
    return {} if device is None else {"device": device}


def top_mask(xp, x: Array, k: int) -> Array:
    """Boolean mask (shape of `x`) of exactly k largest |x|; the lower flat index wins ties."""
    flat = xp.reshape(x, (-1,))
    return xp.reshape(rule_mask(xp, flat, top_rule(xp, flat, k)), x.shape)


def band_mask(xp, x: Array, skip: int, keep: int) -> Array:
    """Mask of the entries ranked skip .. skip+keep-1 by descending |x| (same tie rule as top_mask).

    Model Breadcrumbs keeps this band: it drops the `skip` largest outliers and the smallest rest.
    """
    flat = xp.reshape(x, (-1,))
    return xp.reshape(band_rule(xp, flat, skip, keep)(flat, 0), x.shape)


def band_rule(xp, x: Array, skip: int, keep: int):
    """The band's mask as a function of (chunk, start), decided from the whole flat `x`."""
    inner = top_rule(xp, x, skip + keep)
    outer = top_rule(xp, x, skip) if skip > 0 else None

    def mask(chunk: Array, start: int) -> Array:
        m = rule_mask(xp, chunk, inner, start)
        return m if outer is None else m & ~rule_mask(xp, chunk, outer, start)

    return mask
