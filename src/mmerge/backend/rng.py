"""Counter-based random bits: the same DARE/DELLA mask on every library, device and chunking.

Element `i` of a tensor gets a 31-bit value that depends only on (seed, tensor name, stream,
i). It is computed with int64 array-API arithmetic whose products stay below 2**62, so every
backend gives identical bits; an element is kept when its value is below `floor(p * 2**31)`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

Array = Any

BITS = 31
M31 = (1 << BITS) - 1  # mask for the low 31 bits
CHUNK = 1 << 20  # elements per generated block: bounds the int64 temporaries
_C1 = 0x5BD1E995  # odd multipliers below 2**31: a product with a 31-bit value fits int64
_C2 = 0x045D9F3B


def stream_keys(seed: int, name: str, stream: int = 0) -> tuple[int, int, int]:
    """Three 31-bit keys for (seed, tensor name, stream), hashed with blake2b (never `hash()`)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    data = seed.to_bytes(8, "little") + stream.to_bytes(4, "little") + name.encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=12, person=b"mmerge-rng").digest()
    return tuple(int.from_bytes(digest[j : j + 4], "little") & M31 for j in (0, 4, 8))


def _mix(x: Array) -> Array:
    """A bijection of [0, 2**31) that spreads every input bit over the output bits."""
    x = x ^ (x >> 16)
    x = (x * _C1) & M31
    x = x ^ (x >> 15)
    x = (x * _C2) & M31
    return x ^ (x >> 16)


def _bits(xp, start: int, stop: int, keys: tuple[int, int, int], device) -> Array:
    kw = {} if device is None else {"device": device}
    index = xp.arange(start, stop, dtype=xp.int64, **kw)
    low = index & M31
    high = index >> BITS  # flat indices beyond 2**31 keep their high part
    h = _mix(low ^ keys[0])
    return _mix(h ^ high ^ keys[1]) ^ keys[2]


def random_bits(
    xp, n: int, *, seed: int, name: str, stream: int = 0, start: int = 0, device=None
) -> Array:
    """int64 values in [0, 2**31) for flat indices start .. start+n-1 of the tensor `name`."""
    keys = stream_keys(seed, name, stream)
    return _bits(xp, start, start + n, keys, device)


def keep_threshold(p: float) -> int:
    """The integer cut for keep-probability `p`: a value v is kept when v < floor(p * 2**31)."""
    return min(max(math.floor(p * (1 << BITS)), 0), 1 << BITS)


def keep_mask(
    xp,
    n: int,
    threshold: int | Array,
    *,
    seed: int,
    name: str,
    stream: int = 0,
    start: int = 0,
    device=None,
) -> Array:
    """Boolean keep mask of flat indices start .. start+n-1: random bits below `threshold`.

    `threshold` is one int (DARE) or an int64 array of n per-element cuts (DELLA). The mask is
    built in blocks of CHUNK elements, so it never depends on how the caller chunks a tensor.
    """
    keys = stream_keys(seed, name, stream)
    per_element = not isinstance(threshold, int)
    blocks = []
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        cut = threshold[lo:hi] if per_element else threshold
        blocks.append(_bits(xp, start + lo, start + hi, keys, device) < cut)
    if not blocks:
        kw = {} if device is None else {"device": device}
        return xp.zeros((0,), dtype=xp.bool, **kw)
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks)


def gaussian(shape: tuple[int, ...], *, seed: int, name: str, stream: int = 1) -> Any:
    """Standard normal float32 values for the tensor `name`, from the counter bits of streams
    2*stream and 2*stream + 1 (Box-Muller in float64 on the host): the same numbers on every
    backend, which receives them as they are (the randomized SVD's test matrix)."""
    import numpy as np

    n = math.prod(shape)
    scale = 1.0 / (1 << BITS)
    u1 = (random_bits(np, n, seed=seed, name=name, stream=2 * stream) + 1) * scale  # (0, 1]
    u2 = random_bits(np, n, seed=seed, name=name, stream=2 * stream + 1) * scale  # [0, 1)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return z.astype(np.float32).reshape(shape)
