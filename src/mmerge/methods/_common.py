"""Small pieces the methods share: input checks, a fixed-order model sum, lerp, Gram matrices."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from mmerge import backend
from mmerge.errors import InvalidInput
from mmerge.methods.contract import Blocks, Chunk, Job, Pass, block_dots, block_rows

Array = Any


def require_finite(method: str, tensors: Sequence[Array], base: Array | None) -> None:
    """Raise InvalidInput naming the first input (model i or base) holding NaN or inf."""
    for i, x in enumerate(tensors):
        if not backend.of(x).all_finite(x):
            raise InvalidInput(f"{method}: model {i} has NaN or inf values")
    if base is not None and not backend.of(base).all_finite(base):
        raise InvalidInput(f"{method}: the base model has NaN or inf values")


def finite_chunk(job: Job, chunk: Chunk) -> None:
    """`require_finite` on every input of a chunk (the first pass of a method checks it)."""
    require_finite(job.method.name, chunk.models, chunk.base)


def checked_first(passes: Iterable[Pass]) -> Iterator[Pass]:
    """`passes`, the first of them also checking that every chunk's inputs are finite (so the
    apply after them need not)."""
    for index, p in enumerate(passes):
        if index == 0:
            measure = p.measure

            def checked(job: Job, chunk: Chunk, measure=measure) -> Any:
                finite_chunk(job, chunk)
                return measure(job, chunk)

            p = dataclasses.replace(p, measure=checked)
        yield p


def finite_result(job: Job, chunk: Chunk, result: Array) -> Array:
    """`result`, after the same input check as `require_finite`, done cheaply after the fact.

    Only for methods where any non-finite input makes the result non-finite (linear, task
    arithmetic, nearswap, passthrough): the inputs are scanned only when the result is not
    finite, and a result that overflowed from finite inputs is returned as IEEE gives it.
    """
    if not backend.of(result).all_finite(result):
        finite_chunk(job, chunk)
    return result


def endpoints(chunk: Chunk) -> tuple[Array, Array]:
    """The (start, end) pair of two-endpoint methods: (a, b) for [a, b], or (base, b) for [b]."""
    if chunk.base is None:
        return chunk.models[0], chunk.models[1]
    return chunk.base, chunk.models[0]


def vectors(chunk: Chunk) -> list[Array]:
    """What spherical averages work on: the models, or their task vectors with a base."""
    return chunk.models if chunk.base is None else chunk.deltas


def as_array(xp, value: float, like: Array) -> Array:
    """`value` as a 0-d array of `like`'s dtype and device.

    reciprocal_note: some libraries compute `scalar / array` and `array / scalar` as a product
    with a reciprocal (torch's `rdiv`, torch CUDA), which rounds differently from IEEE division.
    Methods that promise identical bits therefore multiply by a reciprocal computed in Python, or
    divide array by array.
    """
    device = backend.device_of(like)
    kw = {} if device is None else {"device": device}
    return xp.asarray(value, dtype=like.dtype, **kw)


def lerp(a: Array, b: Array, t: float) -> Array:
    """(1 - t) * a + t * b, exactly a at t=0 and b at t=1."""
    return (1.0 - t) * a + t * b


def scaled(x: Array, c: float) -> Array:
    """x * c; x itself when c is 1 (x * 1 is x in IEEE arithmetic, and one array pass fewer)."""
    return x if c == 1 else x * c


def model_sum(terms: Sequence[Array]) -> Array:
    """terms[0] + terms[1] + ... in list order (a fixed order, unlike a library reduction)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def combination(xp, arrays: Sequence[Array], coefficients: Sequence[float]) -> Array:
    """sum_i c_i * x_i in list order, with the coefficients computed in Python."""
    return model_sum([scaled(x, float(c)) for x, c in zip(arrays, coefficients)])


def gram_blocks(job: Job, chunk: Chunk, arrays: Sequence[Array]) -> Blocks:
    """x_i . x_j for i <= j of the flat arrays, per block (the measure of a Gram pass)."""
    pairs = [(arrays[i], arrays[j]) for i in range(len(arrays)) for j in range(i, len(arrays))]
    return block_dots(chunk.xp, pairs, job.block)


def gram_matrix(total: np.ndarray, k: int) -> np.ndarray:
    """The symmetric k x k Gram matrix from the upper-triangle totals of `gram_blocks`."""
    g = np.zeros((k, k))
    g[np.triu_indices(k)] = total
    return g + np.triu(g, 1).T


# -- cosines free of underflow -------------------------------------------------------------------

# per compute dtype, (t, s): a block or row whose squares sum below 2**t may have lost products
# to underflow; its entries times 2**s (exact) have normal products, and none overflows
LIFTS = {"float32": (-80, 90), "float64": (-600, 566)}


def lifted_gram_blocks(job: Job, chunk: Chunk, arrays: Sequence[Array]) -> Blocks:
    """`gram_blocks`, with the blocks where a vector's squares sum below 2**t summed again with
    that vector's entries there times 2**s (spec/methods.md, model_stock): rows of each pair's
    sum (lifted where it was), then how many of the pair's two vectors were lifted."""
    k = len(arrays)
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    sums = gram_blocks(job, chunk, arrays).rows
    threshold, lift = LIFTS[job.compute]
    small = sums[:, [pairs.index((i, i)) for i in range(k)]] < 2.0**threshold
    counts = np.stack([small[:, i].astype(np.float64) + small[:, j] for i, j in pairs], axis=1)
    if small.any():
        factors = np.where(small, 2.0**lift, 1.0).astype(job.compute)
        lifted = [
            _times_per_block(chunk.xp, a, factors[:, i], job.block) for i, a in enumerate(arrays)
        ]
        again = gram_blocks(job, chunk, lifted).rows
        use = (counts > 0) & np.isfinite(again)  # not finite: a huge partner overflowed
        sums, counts = np.where(use, again, sums), np.where(use, counts, 0.0)
    return Blocks(np.concatenate([sums, counts], axis=1))


def _times_per_block(xp, a: Array, factors: np.ndarray, block: int) -> Array:
    """The flat `a` with the entries of block b times factors[b] (`a` itself where all are 1)."""
    if np.all(factors == 1):
        return a
    f = backend.of(a).from_host(factors)
    rows, tail = block_rows(xp, a, block)
    parts = (
        [] if rows is None else [xp.reshape(rows * xp.reshape(f[: rows.shape[0]], (-1, 1)), (-1,))]
    )
    if tail is not None:
        parts.append(tail * f[-1])
    return parts[0] if len(parts) == 1 else xp.concat(parts)


def lifted_cosines(blocks: Blocks, k: int, compute: str) -> np.ndarray:
    """The k x k cosines v_i.v_j / (|v_i||v_j|), clipped to [-1, 1], 0 where a norm is 0, from
    `lifted_gram_blocks`: each total kept as a float64 mantissa and a power of two, so squared
    norms beyond float64's range (float64 subnormal entries) still give their cosines."""
    n = k * (k + 1) // 2
    mantissa, exponent = np.frexp(blocks.rows[:, :n])
    exponent = exponent - LIFTS[compute][1] * blocks.rows[:, n:].astype(np.int64)
    none = np.iinfo(np.int64).min
    top = np.max(np.where(mantissa != 0, exponent, none), axis=0, initial=none)
    top = np.where(top == none, 0, top)
    total = np.sum(np.ldexp(mantissa, exponent - top), axis=0)  # pair p is total[p] * 2**top[p]
    m, e = gram_matrix(total, k), gram_matrix(top.astype(np.float64), k)
    cos = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            if m[i, i] > 0 and m[j, j] > 0:
                scale = 2.0 ** (e[i, j] - (e[i, i] + e[j, j]) / 2)
                cos[i, j] = min(1.0, max(-1.0, m[i, j] / math.sqrt(m[i, i] * m[j, j]) * scale))
    return cos


def lifted_rows(xp, rows: Array, compute: str) -> tuple[Array, Array]:
    """(`rows`, their squares summed along the last axis), each row whose squares sum below 2**t
    times 2**s: the same directions, with no product lost to underflow."""
    threshold, lift = LIFTS[compute]
    squares = xp.sum(rows * rows, axis=-1, keepdims=True)
    small = squares < 2.0**threshold
    if not bool(xp.any(small)):
        return rows, squares
    rows = rows * xp.where(small, as_array(xp, 2.0**lift, rows), as_array(xp, 1.0, rows))
    return rows, xp.sum(rows * rows, axis=-1, keepdims=True)
