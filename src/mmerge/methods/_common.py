"""Small pieces the methods share: input checks, a fixed-order model sum, lerp, Gram matrices."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from mmerge import backend
from mmerge.errors import InvalidInput
from mmerge.methods.contract import Blocks, Chunk, Job, Pass, block_dots

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
