"""Task-vector sparsification: magnitude trim (TIES), random drop (DARE), outlier band
(breadcrumbs), rank-adaptive drop (DELLA), and the rescaling of what survives."""

from __future__ import annotations

import math
from typing import Any

from mmerge import backend
from mmerge.backend import rng, topk
from mmerge.errors import InvalidInput
from mmerge.methods._common import fixed_order_sum

Array = Any

L1_EPS = 1e-7  # mergekit skips the L1 rescale when either sum is below this


def _size(x: Array) -> int:
    return math.prod(x.shape)


def rescaled(xp, delta: Array, kept: Array, rescale: str, keep_prob: float | Array) -> Array:
    """Survivors `kept` of `delta` rescaled: l1 (sum|kept| matched to sum|delta|),
    inverse_density (divided by their keep probability), or none."""
    if rescale == "none":
        return kept
    if rescale == "inverse_density":
        if isinstance(keep_prob, float):
            return kept * (1.0 / keep_prob)  # see _common.reciprocal_note
        return kept / keep_prob
    before = fixed_order_sum(xp, xp.abs(delta))
    after = fixed_order_sum(xp, xp.abs(kept))
    if before < L1_EPS or after < L1_EPS:
        return kept
    return kept * (before / after)


def magnitude(xp, delta: Array, density: float, rescale: str) -> Array:
    """TIES trim: keep the k = max(1, int(density*n)) largest |delta| (lower index wins ties)."""
    if density >= 1:
        return delta
    mask = topk.top_mask(xp, delta, topk.top_count(density, _size(delta)))
    return rescaled(xp, delta, xp.where(mask, delta, 0.0), rescale, density)


def outlier_band(xp, delta: Array, density: float, gamma: float, rescale: str) -> Array:
    """Breadcrumbs: drop the int(gamma*n) largest |delta|, keep the next int(density*n)."""
    if density >= 1:
        return delta
    n = _size(delta)
    keep = int(density * n)
    top = int(gamma * n)
    top = min(top, n - keep)  # too many outliers for the density: drop fewer of them
    mask = topk.band_mask(xp, delta, top, keep)
    return rescaled(xp, delta, xp.where(mask, delta, 0.0), rescale, density)


def random_drop(
    xp, delta: Array, density: float, rescale: str, *, seed: int, name: str, stream: int
) -> Array:
    """DARE: keep each entry with probability `density` by the counter-based mask of backend.rng."""
    if density >= 1:
        return delta
    flat = rng.keep_mask(
        xp,
        _size(delta),
        rng.keep_threshold(density),
        seed=seed,
        name=name,
        stream=stream,
        device=backend.device_of(delta),
    )
    mask = xp.reshape(flat, delta.shape)
    return rescaled(xp, delta, xp.where(mask, delta, 0.0), rescale, density)


def check_della(method: str, density: tuple[float, ...], epsilon: tuple[float, ...]) -> None:
    """DELLA's keep probabilities density +/- epsilon must lie in (0, 1] for every model."""
    for i, (d, e) in enumerate(zip(density, epsilon)):
        if d < 1 and not (d - e > 0 and d + e <= 1):
            raise InvalidInput(
                f"{method}: model {i} needs density - epsilon > 0 and density + epsilon <= 1, "
                f"got density {d:g}, epsilon {e:g}"
            )


def _rows(x: Array) -> tuple[int, ...]:
    """The shape DELLA ranks in: along axis 1, a 1-D tensor as one row (mergekit's rule)."""
    if x.ndim >= 2:
        return tuple(x.shape)
    return (1, _size(x))


def della_drop(
    xp,
    delta: Array,
    density: float,
    epsilon: float,
    rescale: str,
    *,
    seed: int,
    name: str,
    stream: int,
) -> Array:
    """DELLA: keep each entry with probability (density-eps) + 2*eps*rank/(n-1), where rank is
    its ascending |delta| rank along axis 1 (lower index ranks lower among equals)."""
    if density >= 1:
        return delta
    shape = _rows(delta)
    n = shape[1]
    device = backend.device_of(delta)
    if n == 1:
        prob: float | Array = density
        cut: int | Array = rng.keep_threshold(density)
    else:
        a = xp.abs(xp.reshape(delta, shape))
        rank = xp.argsort(xp.argsort(a, axis=1, stable=True), axis=1, stable=True)
        rank = xp.astype(rank, delta.dtype) / (n - 1)
        prob = xp.clip((density - epsilon) + (rank * 2.0) * epsilon, 0.0, 1.0)
        cut = xp.reshape(xp.astype(xp.floor(prob * float(1 << rng.BITS)), xp.int64), (-1,))
        prob = xp.reshape(prob, delta.shape)
    flat = rng.keep_mask(xp, _size(delta), cut, seed=seed, name=name, stream=stream, device=device)
    kept = xp.where(xp.reshape(flat, delta.shape), delta, 0.0)
    return rescaled(xp, delta, kept, rescale, prob)
