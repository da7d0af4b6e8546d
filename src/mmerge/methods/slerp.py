"""Spherical interpolation of two models: SLERP on the flattened tensor, and NuSLERP (weights
instead of t, optional base, optionally per row or per column).

Both need the norms and the dot product of the two vectors: for a whole flattened tensor they
come from one pass (block sums), after which every chunk is `c0 * a + c1 * b`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mmerge import backend
from mmerge.methods._common import endpoints, finite_chunk, lerp, vectors
from mmerge.methods.contract import Blocks, Pass, block_dots
from mmerge.methods.registry import Param, register

Array = Any

ZERO_NORM = 1e-8  # a vector with a norm at most this has no direction: lerp
MIN_SIN = 1e-3  # |sin theta| below this (within 0.06 degrees of 0 or 180): lerp


def slerp_coefficients(cos: float, t: float) -> tuple[float, float]:
    """Shoemake's (c0, c1) with slerp = c0 * a + c1 * b for unit vectors at cosine `cos`."""
    theta = math.acos(min(1.0, max(-1.0, cos)))
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def _pair_sums(pair):
    """A pass measuring |a|^2, |b|^2 and a.b of the flattened pair `pair(chunk)`."""

    def measure(job, chunk) -> Blocks:
        finite_chunk(job, chunk)
        a, b = pair(chunk)
        return block_dots(chunk.xp, [(a, a), (b, b), (a, b)], job.block)

    return Pass("norms", measure, lambda job, blocks: tuple(map(float, blocks.total())))


def _slerp_passes(job):
    yield _pair_sums(endpoints)


def _arc(aa: float, bb: float, ab: float, t: float, dot_threshold: float = 1.0):
    """(c0, c1) of the arc from a to b, or None where slerp falls back to lerp."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if na <= ZERO_NORM or nb <= ZERO_NORM:
        return None
    cos = ab / (na * nb)
    if abs(cos) > dot_threshold or math.sqrt(max(0.0, 1.0 - cos * cos)) < MIN_SIN:
        return None
    return slerp_coefficients(cos, t)


@register(
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
    passes=_slerp_passes,
    base="endpoint",
    min_models=2,
    max_models=2,
    reference="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); mergekit",
    self_merge={},
    tolerance=2e-4,
)
def slerp(job, chunk):
    a, b = endpoints(chunk)
    t = job.params["t"]
    aa, bb, ab = job.stats["norms"]
    arc = _arc(aa, bb, ab, t, job.params["dot_threshold"])
    if arc is None:
        return lerp(a, b, t)
    c0, c1 = arc
    if job.params["magnitude"] == "shoemake":
        return c0 * a + c1 * b
    na, nb = math.sqrt(aa), math.sqrt(bb)
    norm = (1.0 - t) * na + t * nb
    return (c0 * norm / na) * a + (c1 * norm / nb) * b


# -- NuSLERP -----------------------------------------------------------------------------------


def _nuslerp_t(weight: tuple[float, float]) -> float:
    total = weight[0] + weight[1]
    return 0.5 if abs(total) < 1e-6 else weight[1] / total


def _layout(job) -> str:
    """flat (the whole tensor), rows (vectors along the last axis) or columns (the first)."""
    if job.params["nuslerp_flatten"] or len(job.shape) <= 1:
        return "flat"
    return "columns" if job.params["nuslerp_row_wise"] else "rows"


def _columns(job) -> int:
    """Entries per slice along the first axis: the number of vectors in `columns` layout."""
    return math.prod(job.shape[1:])


def _nuslerp_granule(job) -> int:
    layout = _layout(job)
    if layout == "rows":
        return job.shape[-1]
    return _columns(job) if layout == "columns" else 1


def _column_sums(job, chunk) -> Blocks:
    """Per block of whole first-axis slices: column sums of v0^2, v1^2 and v0.v1."""
    finite_chunk(job, chunk)
    xp = chunk.xp
    v0, v1 = vectors(chunk)
    width = _columns(job)
    per_block = job.block // width
    parts = []
    for x, y in ((v0, v0), (v1, v1), (v0, v1)):
        rows = chunk.rows(x * y, width)
        n = rows.shape[0]
        whole = n - n % per_block
        sums = []
        if whole:
            grouped = xp.reshape(rows[:whole, :], (-1, per_block, width))
            sums.append(np.asarray(backend.to_host(xp.sum(grouped, axis=1)), np.float64))
        if whole < n:
            tail = xp.sum(rows[whole:, :], axis=0)
            sums.append(np.asarray(backend.to_host(tail), np.float64).reshape(1, width))
        parts.append(np.concatenate(sums))
    return Blocks(np.stack(parts, axis=1))


def _nuslerp_passes(job):
    layout = _layout(job)
    if layout == "flat":
        yield _pair_sums(lambda chunk: tuple(vectors(chunk)))
    elif layout == "columns":
        yield Pass("norms", _column_sums, lambda job, blocks: blocks.total())


def _column_coefficients(sums: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """(c0, c1) per column from the (3, columns) sums; lerp coefficients where degenerate."""
    aa, bb, ab = sums
    na, nb = np.sqrt(aa), np.sqrt(bb)
    zero = (na <= ZERO_NORM) | (nb <= ZERO_NORM)
    cos = np.clip(ab / np.where(zero, 1.0, na * nb), -1.0, 1.0)
    theta = np.arccos(cos)
    sin = np.sin(theta)
    flat = zero | (np.abs(sin) < MIN_SIN)
    safe = np.where(flat, 1.0, sin)
    c0 = np.where(flat, 1.0 - t, np.sin((1.0 - t) * theta) / safe)
    c1 = np.where(flat, t, np.sin(t * theta) / safe)
    return c0, c1


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
    passes=_nuslerp_passes,
    granule=_nuslerp_granule,
    base="optional",
    min_models=2,
    max_models=2,
    reference="mergekit NuSLERP (Goddard et al. 2024, arXiv:2403.13257)",
    symmetric=True,
    self_merge={},
    tolerance=2e-4,
)
def nuslerp(job, chunk):
    xp = chunk.xp
    t = _nuslerp_t(job.params["weight"])
    v0, v1 = vectors(chunk)
    layout = _layout(job)
    if layout == "flat":
        arc = _arc(*job.stats["norms"], t)
        out = lerp(v0, v1, t) if arc is None else arc[0] * v0 + arc[1] * v1
    elif layout == "rows":
        finite_chunk(job, chunk)
        width = job.shape[-1]
        out = xp.reshape(slerp_rows(xp, chunk.rows(v0, width), chunk.rows(v1, width), t), (-1,))
    else:
        width = _columns(job)
        c0, c1 = _column_coefficients(job.stats["norms"], t)
        on = backend.of(v0)
        c0 = on.from_host(c0.astype(job.compute))
        c1 = on.from_host(c1.astype(job.compute))
        out = xp.reshape(c0 * chunk.rows(v0, width) + c1 * chunk.rows(v1, width), (-1,))
    return out if chunk.base is None else chunk.base + out
