"""Counter-based random bits: the same DARE/DELLA mask on every library, device and chunking.

Element `i` of a tensor gets a 32-bit value that depends only on (seed, tensor name, stream,
i): a 32-bit integer hash of `i` mixed with keys drawn from (seed, name, stream). This module is
the portable form, int64 array-API arithmetic whose products stay below 2**60, so every
backend gives identical bits; backends may compute the same bits faster (numpy: uint32). An
element is kept when its value is below `floor(p * 2**32)`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

Array = Any

BITS = 32
M32 = (1 << BITS) - 1
MULTIPLIER = 0x045D9F3B  # odd, below 2**27: a product with a 32-bit value fits int64


def stream_keys(seed: int, name: str, stream: int = 0) -> tuple[int, int]:
    """Two 32-bit keys for (seed, tensor name, stream), hashed with blake2b (never `hash()`)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    data = seed.to_bytes(8, "little") + stream.to_bytes(4, "little") + name.encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=8, person=b"mmerge-rng32").digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def mix(x: int) -> int:
    """The 32-bit hash of one integer in [0, 2**32): a bijection that spreads every bit."""
    x ^= x >> 16
    x = (x * MULTIPLIER) & M32
    x ^= x >> 16
    x = (x * MULTIPLIER) & M32
    return x ^ (x >> 16)


def block_key(keys: tuple[int, int], start: int) -> int:
    """The key xored into the low 32 bits of indices that share `start`'s high part."""
    return keys[0] ^ mix((start >> BITS) ^ keys[1])


def _mix_array(x: Array) -> Array:
    x = x ^ (x >> 16)
    x = (x * MULTIPLIER) & M32
    x = x ^ (x >> 16)
    x = (x * MULTIPLIER) & M32
    return x ^ (x >> 16)


def random_bits(xp, n: int, keys: tuple[int, int], start: int = 0, device=None) -> Array:
    """int64 values in [0, 2**32) for flat indices start .. start+n-1 (portable form)."""
    kw = {} if device is None else {"device": device}
    pieces = []
    for lo, hi in spans(start, start + n):
        index = xp.arange(lo & M32, ((hi - 1) & M32) + 1, dtype=xp.int64, **kw)
        pieces.append(_mix_array(index ^ block_key(keys, lo)))
    if not pieces:
        return xp.zeros((0,), dtype=xp.int64, **kw)
    return pieces[0] if len(pieces) == 1 else xp.concat(pieces)


def spans(start: int, stop: int, block: int = 1 << BITS):
    """[start, stop) cut into pieces of at most `block` indices that never cross a multiple of
    2**32 (where the high part of the index, and so the key, changes)."""
    s = start
    while s < stop:
        e = min(stop, s + block, ((s >> BITS) + 1) << BITS)
        yield s, e
        s = e


def keep_threshold(p: float) -> int:
    """The integer cut for keep-probability `p`: a value v is kept when v < floor(p * 2**32)."""
    return min(max(math.floor(p * (1 << BITS)), 0), 1 << BITS)


def keep_mask(
    xp, n: int, threshold: int | Array, keys: tuple[int, int], start: int = 0, device=None
) -> Array:
    """Boolean keep mask of flat indices start .. start+n-1: random bits below `threshold`
    (one int, or an int64 array of n per-element cuts), in the portable form."""
    bits = random_bits(xp, n, keys, start, device)
    return bits < threshold


def gaussian(shape: tuple[int, ...], *, seed: int, name: str, stream: int = 1) -> Any:
    """Standard normal float32 values for the tensor `name`, from the counter bits of streams
    2*stream and 2*stream + 1 (Box-Muller in float64 on the host): the same numbers on every
    backend, which receives them as they are (the randomized SVD's test matrix)."""
    import numpy as np

    n = math.prod(shape)
    scale = 1.0 / (1 << BITS)
    u1 = (random_bits(np, n, stream_keys(seed, name, 2 * stream)) + 1) * scale  # (0, 1]
    u2 = random_bits(np, n, stream_keys(seed, name, 2 * stream + 1)) * scale  # [0, 1)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return z.astype(np.float32).reshape(shape)
