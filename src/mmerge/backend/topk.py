"""Exact top-k selection by magnitude, with ties broken by flat index, on any backend.

The array API has no partial sort, so the k-th largest magnitude comes from a short native
fast path where a library has one (numpy/cupy `partition`, torch `kthvalue`/`topk`, mlx
`partition`) and from `sort` otherwise. The mask is then built with standard operations only,
so it is the same on every backend: all magnitudes above the threshold, plus the first entries
equal to it in flat order until exactly k are kept.
"""

from __future__ import annotations

from typing import Any

from mmerge import backend

Array = Any


def top_count(density: float, n: int) -> int:
    """How many of n entries a top-`density` trim keeps: max(1, int(density * n)), as mergekit."""
    if density >= 1:
        return n
    return min(n, max(1, int(density * n)))


def kth_largest(xp, a: Array, k: int) -> Array:
    """The k-th largest value (1 <= k <= n) of the flat array `a` (a 0-d array or scalar)."""
    n = a.shape[0]
    lib = backend.library_name(a)
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


def top_mask(xp, x: Array, k: int) -> Array:
    """Boolean mask (shape of `x`) of exactly k largest |x|; the lower flat index wins ties."""
    shape = x.shape
    a = xp.abs(xp.reshape(x, (-1,)))
    n = a.shape[0]
    if k <= 0:  # comparisons give all-False / all-True masks on the right device
        return xp.reshape(a < 0, shape)
    if k >= n:
        return xp.reshape(a >= 0, shape)
    threshold = kth_largest(xp, a, k)
    at_least = a >= threshold
    if int(xp.count_nonzero(at_least)) == k:
        return xp.reshape(at_least, shape)
    above = a > threshold
    needed = k - int(xp.count_nonzero(above))
    equal = a == threshold
    order = xp.cumulative_sum(xp.astype(equal, xp.int64))  # 1-based rank among equal entries
    return xp.reshape(above | (equal & (order <= needed)), shape)


def band_mask(xp, x: Array, skip: int, keep: int) -> Array:
    """Mask of the entries ranked skip .. skip+keep-1 by descending |x| (same tie rule as top_mask).

    Model Breadcrumbs keeps this band: it drops the `skip` largest outliers and the smallest rest.
    """
    inner = top_mask(xp, x, skip + keep)
    if skip <= 0:
        return inner
    return inner & ~top_mask(xp, x, skip)
