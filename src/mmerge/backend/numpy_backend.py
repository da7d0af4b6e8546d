"""NumPy: the host itself. Stored bytes widen straight from the memory map into reused buffers;
random bits in uint32 (the same values as the portable int64 form, at a fraction of the cost)."""

from __future__ import annotations

import sys

import numpy as np

from mmerge.backend import rng
from mmerge.backend.base import Array, Backend, check_host, partitioned_kth

_L2_BLOCK = 1 << 16  # uint32 entries hashed at a time: the temporaries stay in the L2 cache
LONG_ROW = 128  # rows at least this long are inverted row by row (see _invert)


class NumpyBackend(Backend):
    name = "numpy"
    module = "numpy"
    tile_elements = 1 << 18  # 1 MiB of float32 per array: temporaries stay in L2, few calls

    def from_host(self, host: np.ndarray) -> Array:
        return check_host(host)

    def to_host(self, x: Array) -> np.ndarray:
        return np.asarray(x)  # numpy gives scalars for arithmetic on 0-d arrays

    def from_stored(self, raw, dtype, compute="float32", slot=0) -> Array:
        return self.widen(raw, dtype, compute, slot)

    def all_finite(self, x: Array) -> bool:
        """Entry by entry: numpy tests entries in half the time its pairwise sum adds them."""
        return bool(np.isfinite(x).all())

    def float_bits(self, x: Array) -> Array:
        return x.view(np.int32 if x.dtype.itemsize == 4 else np.int64)

    def digits(self, bits: Array, shift: int) -> Array:
        if sys.byteorder != "little" or bits.ndim != 1:
            return super().digits(bits, shift)
        per_item = bits.dtype.itemsize // 2  # a strided view of 16-bit halves: nothing computed
        return bits.view(np.uint16)[shift // 16 :: per_item]

    def bincount(self, x: Array, length: int, where: Array | None = None) -> np.ndarray:
        values = x.reshape(-1) if where is None else x.reshape(-1)[where.reshape(-1)]
        return np.bincount(values, minlength=length).astype(np.int64, copy=False)

    def compress(self, x: Array, where: Array) -> tuple[Array, Array]:
        index = np.flatnonzero(where)
        return x[index], index

    def kth_largest(self, a: Array, k: int) -> tuple[int | float, int, int]:
        a.partition(a.shape[0] - k)  # in place: no copy of a whole tensor's statistic
        return partitioned_kth(np, a, k)

    def ranks(self, a: Array, axis: int) -> Array:
        if a.dtype != np.float32:
            return super().ranks(a, axis)
        # one sort of unique int64 keys: the value's bits above, its position below (the
        # bits of non-negative floats order as their values), then the inverse permutation
        lines = np.moveaxis(a, axis, -1)
        n = lines.shape[-1]
        keys = lines.view(np.int32).astype(np.int64) << 32
        keys |= np.arange(n, dtype=np.int64)
        keys.sort(axis=-1)
        order = np.bitwise_and(keys, 0xFFFFFFFF, out=keys)
        out = np.empty(lines.shape, np.int64)
        _invert(out.reshape(-1, n), order.reshape(-1, n))
        return np.moveaxis(out, -1, axis)

    def keep_mask(self, n: int, threshold, keys: tuple[int, int], start: int = 0) -> Array:
        out = np.empty(n, bool)
        per_element = not isinstance(threshold, int)
        cut = None if per_element else _uint32_cut(threshold)
        for lo, hi in rng.spans(start, start + n, _L2_BLOCK):
            x = np.arange(lo & rng.M32, ((hi - 1) & rng.M32) + 1, dtype=np.uint32)
            x ^= np.uint32(rng.block_key(keys, lo))
            _mix_in_place(x)
            part = out[lo - start : hi - start]
            if per_element:
                np.less(x, threshold[lo - start : hi - start], out=part)
            elif cut is None:
                part.fill(True)  # p = 1: every 32-bit value is below 2**32
            else:
                np.less(x, cut, out=part)
        return out


def _invert(out: np.ndarray, order: np.ndarray) -> None:
    """out[r, order[r, j]] = j for every row r: row by row where rows are long (a 1-D scatter
    per row takes a quarter of put_along_axis's time on rows of 2048), in one call where they
    are short (the loop's per-row cost then dominates)."""
    n = order.shape[1]
    if n < LONG_ROW:
        np.put_along_axis(out, order, np.broadcast_to(np.arange(n), order.shape), axis=1)
        return
    positions = np.arange(n)
    for row, where in zip(out, order):
        row[where] = positions


def _uint32_cut(threshold: int) -> np.uint32 | None:
    """The cut as uint32, or None when it is 2**32 (keep everything)."""
    return None if threshold >= 1 << rng.BITS else np.uint32(max(threshold, 0))


def _mix_in_place(x: np.ndarray) -> None:
    """`rng.mix` on uint32 entries: products wrap modulo 2**32, which is the hash's arithmetic."""
    shifted = np.empty_like(x)
    multiplier = np.uint32(rng.MULTIPLIER)
    for last in (False, False, True):
        np.right_shift(x, 16, out=shifted)
        x ^= shifted
        if not last:
            x *= multiplier
