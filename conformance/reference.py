"""Plain numpy float64 reference pieces, written from spec/methods.md and never calling mmerge:
top-k and band trims with the spec's tie rule, sign election, and the counter-based random
bits of DARE/DELLA. make_vectors.py and the property tests use them."""

from __future__ import annotations

import hashlib

import numpy as np


def rank_by_magnitude(x: np.ndarray) -> np.ndarray:
    """Flat indices ordered by descending |x|, equal magnitudes by ascending flat index."""
    flat = np.abs(np.asarray(x, np.float64).reshape(-1))
    return np.lexsort((np.arange(flat.size), -flat))


def top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k largest |x| (ties: lower flat index first), shaped like x."""
    mask = np.zeros(x.size, bool)
    mask[rank_by_magnitude(x)[: max(0, k)]] = True
    return mask.reshape(np.shape(x))


def ties_count(density: float, n: int) -> int:
    """How many entries a TIES trim keeps: all at density 1, else max(1, int(density * n))."""
    return n if density >= 1 else min(n, max(1, int(density * n)))


def band_mask(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs: skip the int(gamma*n) largest (fewer if density leaves no room), keep the
    next int(density*n); everything at density 1."""
    n = x.size
    if density >= 1:
        return np.ones(np.shape(x), bool)
    keep = int(density * n)
    skip = min(int(gamma * n), n - keep)
    mask = np.zeros(n, bool)
    mask[rank_by_magnitude(x)[skip : skip + keep]] = True
    return mask.reshape(np.shape(x))


def elected_positive(votes: list[np.ndarray], election: str) -> np.ndarray:
    """True where the elected sign is + (an exact zero total counts as +)."""
    if election == "count":
        return sum(np.sign(v) for v in votes) >= 0
    return sum(votes) >= 0


# -- counter-based random bits (spec/methods.md, "Random drop masks") ----------------------

_M32 = (1 << 32) - 1
_C = 0x045D9F3B


def stream_keys(seed: int, name: str, stream: int) -> tuple[int, int]:
    """Two 32-bit keys from blake2b(seed LE 8 bytes, stream LE 4 bytes, UTF-8 name)."""
    data = seed.to_bytes(8, "little") + stream.to_bytes(4, "little") + name.encode("utf-8")
    digest = hashlib.blake2b(data, digest_size=8, person=b"mmerge-rng32").digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> 16)
    x = (x * _C) & _M32
    x = x ^ (x >> 16)
    x = (x * _C) & _M32
    return x ^ (x >> 16)


def random_bits(n: int, seed: int, name: str, stream: int, start: int = 0) -> np.ndarray:
    """The 32-bit value of flat indices start .. start+n-1 (int64)."""
    k0, k1 = stream_keys(seed, name, stream)
    index = np.arange(start, start + n, dtype=np.int64)
    return _mix((index & _M32) ^ k0 ^ _mix((index >> 32) ^ k1))


def keep_threshold(p: np.ndarray | float) -> np.ndarray:
    """Integer cut for keep-probability p: a value v is kept when v < floor(p * 2**32)."""
    return np.clip(np.floor(np.asarray(p, np.float64) * 2.0**32), 0, 2**32).astype(np.int64)
