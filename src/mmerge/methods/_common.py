"""Small pieces the method bodies share: input checks, a fixed-order sum, lerp."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmerge import backend
from mmerge.errors import InvalidInput

Array = Any


def _all_finite(xp, x: Array) -> bool:
    return bool(xp.all(xp.isfinite(x)))


def require_finite(xp, method: str, tensors: Sequence[Array], base: Array | None) -> None:
    """Raise InvalidInput naming the first input (model i or base) holding NaN or inf."""
    for i, x in enumerate(tensors):
        if not _all_finite(xp, x):
            raise InvalidInput(f"{method}: model {i} has NaN or inf values")
    if base is not None and not _all_finite(xp, base):
        raise InvalidInput(f"{method}: the base model has NaN or inf values")


def finite_result(
    xp, method: str, result: Array, tensors: Sequence[Array], base: Array | None
) -> Array:
    """`result`, after the same input check as `require_finite`, done cheaply after the fact.

    Only for methods where any non-finite input makes the result non-finite (linear, task
    arithmetic, nearswap, passthrough): the inputs are scanned only when the result is not
    finite, and a result that overflowed from finite inputs is returned as IEEE gives it.
    """
    if not _all_finite(xp, result):
        require_finite(xp, method, tensors, base)
    return result


def no_base(method: str, base: Array | None) -> None:
    """A clear error for a base model given to a method that does not use one."""
    if base is not None:
        raise InvalidInput(f"{method} does not use a base model; pass the models only")


def pair(method: str, tensors: Sequence[Array], base: Array | None) -> tuple[Array, Array]:
    """The (start, end) pair of two-model methods: (a, b) for [a, b], or (base, b) for [b]."""
    if base is None:
        if len(tensors) != 2:
            raise InvalidInput(f"{method} needs exactly two models, got {len(tensors)}")
        return tensors[0], tensors[1]
    if len(tensors) != 1:
        raise InvalidInput(
            f"{method} takes two models, or one model and a base; got {len(tensors)} and a base"
        )
    return base, tensors[0]


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


def fixed_order_sum(xp, x: Array) -> float:
    """Sum of all entries by pairwise halving in a fixed order: the same bits on every backend.

    Library reductions add in different orders (and so round differently); this one uses only
    elementwise additions, which IEEE 754 makes identical everywhere. Used where a sum feeds a
    result that must be bit-identical across backends (the L1 rescale of DARE).
    """
    x = xp.reshape(x, (-1,))
    n = x.shape[0]
    if n == 0:
        return 0.0
    carry = None
    while n > 1:
        half = n // 2
        if n % 2:
            tail = x[2 * half :]
            carry = tail if carry is None else carry + tail
        x = x[:half] + x[half : 2 * half]
        n = half
    if carry is not None:
        x = x + carry
    return float(x[0])


def model_sum(terms: Sequence[Array]) -> Array:
    """terms[0] + terms[1] + ... in list order (a fixed order, unlike a library reduction)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


SUM_BLOCK = 1 << 16  # entries per block of `block_dots`; the engine's chunks are multiples


def block_dots(xp, pairs: Sequence[tuple[Array, Array]]) -> tuple[float, ...]:
    """sum(x * y) for each (x, y) pair of flat arrays, accumulated in float64 over blocks of
    SUM_BLOCK entries in order, so a tensor summed whole or chunk by chunk (chunks made of whole
    blocks, partial results added in order) gives the same float."""
    totals = [0.0] * len(pairs)
    n = pairs[0][0].shape[0] if pairs else 0
    for s in range(0, n, SUM_BLOCK):
        e = min(s + SUM_BLOCK, n)
        for j, (x, y) in enumerate(pairs):
            totals[j] += float(xp.vecdot(x[s:e], y[s:e]))
    return tuple(totals)
