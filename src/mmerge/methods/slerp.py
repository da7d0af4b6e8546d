"""Spherical interpolation of two models: SLERP on the flattened tensor, and NuSLERP
(weights instead of t, optional base, optionally per row)."""

from __future__ import annotations

import math
from typing import Any

from mmerge.methods._common import block_dots, lerp, pair, require_finite
from mmerge.methods.registry import Param, register

Array = Any

ZERO_NORM = 1e-8  # a vector with a norm at most this has no direction: lerp
MIN_SIN = 1e-3  # |sin theta| below this (within 0.06 degrees of 0 or 180): lerp


def slerp_coefficients(cos: float, t: float) -> tuple[float, float]:
    """Shoemake's (c0, c1) with slerp = c0 * a + c1 * b for unit vectors at cosine `cos`."""
    theta = math.acos(min(1.0, max(-1.0, cos)))
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def _slerp_sums(xp, tensors, *, base, **_):
    """|a|^2, |b|^2 and a.b: all slerp needs from the whole tensors (additive over chunks)."""
    a, b = pair("slerp", tensors, base)
    fa, fb = xp.reshape(a, (-1,)), xp.reshape(b, (-1,))
    return block_dots(xp, [(fa, fa), (fb, fb), (fa, fb)])


def slerp(xp, tensors, *, base, t, dot_threshold, magnitude, prepared=None, start=0):
    require_finite(xp, "slerp", tensors, base)
    a, b = pair("slerp", tensors, base)
    aa, bb, ab = prepared if prepared is not None else _slerp_sums(xp, tensors, base=base)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if na <= ZERO_NORM or nb <= ZERO_NORM:
        return lerp(a, b, t)
    cos = ab / (na * nb)
    if abs(cos) > dot_threshold or math.sqrt(max(0.0, 1.0 - cos * cos)) < MIN_SIN:
        return lerp(a, b, t)
    c0, c1 = slerp_coefficients(cos, t)
    if magnitude == "shoemake":
        return c0 * a + c1 * b
    norm = (1.0 - t) * na + t * nb
    return (c0 * norm / na) * a + (c1 * norm / nb) * b


slerp = register(
    "slerp",
    "spherical interpolation of two models (t=0: the first model, or the base if given)",
    params=(
        Param(
            "t",
            float,
            0.5,
            "position on the arc: 0 = first model (or base), 1 = other",
            low=0.0,
            high=1.0,
        ),
        Param(
            "dot_threshold",
            float,
            0.9995,
            "|cos| above this counts as (anti)parallel and falls back to lerp",
            low=0.0,
            high=1.0,
            low_open=True,
        ),
        Param(
            "magnitude",
            str,
            "shoemake",
            "shoemake: coefficients on the raw tensors (mergekit); norm_interp: unit-vector "
            "slerp scaled to (1-t)|a| + t|b|",
            choices=("shoemake", "norm_interp"),
        ),
    ),
    min_models=1,
    max_models=2,
    sums=_slerp_sums,
    reference="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); mergekit",
)(slerp)


def _to_last(xp, x: Array, axis: int) -> Array:
    """Swap `axis` and the last axis (its own inverse)."""
    order = list(range(x.ndim))
    order[axis], order[-1] = order[-1], order[axis]
    return xp.permute_dims(x, tuple(order))


def slerp_rows(xp, v0: Array, v1: Array, t: float) -> Array:
    """Shoemake slerp of each vector along the last axis, lerp where degenerate (zero norm,
    parallel or antipodal: |sin theta| < 1e-3)."""
    n0 = xp.linalg.vector_norm(v0, axis=-1, keepdims=True)
    n1 = xp.linalg.vector_norm(v1, axis=-1, keepdims=True)
    zero = (n0 <= ZERO_NORM) | (n1 <= ZERO_NORM)
    u0 = v0 / xp.where(zero, 1.0, n0)
    u1 = v1 / xp.where(zero, 1.0, n1)
    cos = xp.clip(xp.sum(u0 * u1, axis=-1, keepdims=True), -1.0, 1.0)
    theta = xp.acos(cos)
    sin = xp.sin(theta)
    flat = zero | (xp.abs(sin) < MIN_SIN)
    arc = (xp.sin((1.0 - t) * theta) * v0 + xp.sin(t * theta) * v1) / xp.where(flat, 1.0, sin)
    return xp.where(flat, lerp(v0, v1, t), arc)


@register(
    "nuslerp",
    "slerp of two models with t = w1 / (w0 + w1); with a base, of their task vectors",
    params=(
        Param("weight", float, 1.0, "weight of each model (t = w1 / (w0 + w1))", per_model=True),
        Param("nuslerp_flatten", bool, True, "treat the whole tensor as one vector"),
        Param(
            "nuslerp_row_wise",
            bool,
            False,
            "when not flattened: vectors along the first axis instead of the last",
        ),
    ),
    min_models=2,
    max_models=2,
    reference="mergekit NuSLERP (Goddard et al. 2024, arXiv:2403.13257)",
)
def nuslerp(xp, tensors, *, base, weight, nuslerp_flatten, nuslerp_row_wise):
    require_finite(xp, "nuslerp", tensors, base)
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    v0, v1 = tensors if base is None else (tensors[0] - base, tensors[1] - base)
    shape = v0.shape
    if nuslerp_flatten or v0.ndim <= 1:
        out = xp.reshape(slerp_rows(xp, xp.reshape(v0, (1, -1)), xp.reshape(v1, (1, -1)), t), shape)
    elif nuslerp_row_wise:
        out = _to_last(xp, slerp_rows(xp, _to_last(xp, v0, 0), _to_last(xp, v1, 0), t), 0)
    else:
        out = slerp_rows(xp, v0, v1, t)
    return out if base is None else base + out
