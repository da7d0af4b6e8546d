"""Task-vector sparsification: magnitude trim (TIES), random drop (DARE), outlier band
(breadcrumbs), rank-adaptive drop (DELLA), and the rescaling of what survives."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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
        # a float p multiplies by its reciprocal: see _common.reciprocal_note
        scaled = kept * (1.0 / keep_prob) if isinstance(keep_prob, float) else kept / keep_prob
        return xp.where(kept == 0, kept, scaled)  # 1/p may overflow: 0 * inf would be NaN
    factor = l1_factor(xp, delta, kept)
    return kept if factor is None else kept * factor


def l1_factor(xp, delta: Array, kept: Array) -> float | None:
    """sum|delta| / sum|kept| (fixed-order sums), or None when either is below L1_EPS."""
    before = fixed_order_sum(xp, xp.abs(delta))
    after = fixed_order_sum(xp, xp.abs(kept))
    if before < L1_EPS or after < L1_EPS:
        return None
    return before / after


@dataclass(frozen=True)
class Survivors:
    """Which entries of one task vector survive a trim or drop, decided from the whole flat
    vector, and the factor they are multiplied by (None: unchanged). `mask(chunk, start)`
    gives the keep mask of flat entries start .. start+len(chunk)-1, so a large tensor can be
    merged chunk by chunk with the same bits as in one piece."""

    mask: Callable[[Array, int], Array] | None  # None: everything survives
    factor: float | None = None


def survivors_of(
    xp, delta: Array, mask: Callable[[Array, int], Array], rescale: str, density: float
) -> Survivors:
    """Survivors of the flat `delta` under `mask`, with the rescale factor `rescale` asks for."""
    if rescale == "none":
        return Survivors(mask)
    if rescale == "inverse_density":
        return Survivors(mask, 1.0 / density)
    return Survivors(mask, l1_factor(xp, delta, xp.where(mask(delta, 0), delta, 0.0)))


def apply_survivors(xp, delta: Array, survivors: Survivors, start: int = 0) -> Array:
    """`delta` (any shape; flat entries from `start`) with dropped entries zeroed, rescaled."""
    if survivors.mask is None:
        return delta
    flat = xp.reshape(delta, (-1,))
    # a product with the 0/1 mask, not where(): the same values for finite inputs (a dropped
    # entry may be -0), and many times faster where the mask is irregular
    kept = xp.reshape(flat * xp.astype(survivors.mask(flat, start), flat.dtype), delta.shape)
    if survivors.factor is None:
        return kept
    if math.isfinite(survivors.factor):
        return kept * survivors.factor
    return xp.where(kept == 0, kept, kept * survivors.factor)  # 0 * inf would be NaN


def magnitude(xp, delta: Array, density: float, rescale: str) -> Survivors:
    """TIES trim: keep the k = max(1, int(density*n)) largest |delta| (lower index wins ties)."""
    if density >= 1:
        return Survivors(None)
    flat = xp.reshape(delta, (-1,))
    rule = topk.top_rule(xp, flat, topk.top_count(density, _size(flat)))
    return survivors_of(
        xp, flat, lambda x, start: topk.rule_mask(xp, x, rule, start), rescale, density
    )


def outlier_band(xp, delta: Array, density: float, gamma: float, rescale: str) -> Survivors:
    """Breadcrumbs: drop the int(gamma*n) largest |delta|, keep the next int(density*n)."""
    if density >= 1:
        return Survivors(None)
    flat = xp.reshape(delta, (-1,))
    n = _size(flat)
    keep = int(density * n)
    top = int(gamma * n)
    top = min(top, n - keep)  # too many outliers for the density: drop fewer of them
    return survivors_of(xp, flat, topk.band_rule(xp, flat, top, keep), rescale, density)


def random_drop(
    xp, delta: Array, density: float, rescale: str, *, seed: int, name: str, stream: int
) -> Survivors:
    """DARE: keep each entry with probability `density` by the counter-based mask of backend.rng."""
    if density >= 1:
        return Survivors(None)
    flat = xp.reshape(delta, (-1,))
    threshold = rng.keep_threshold(density)
    device = backend.device_of(delta)

    def mask(x: Array, start: int) -> Array:
        return rng.keep_mask(
            xp, _size(x), threshold, seed=seed, name=name, stream=stream, start=start, device=device
        )

    return survivors_of(xp, flat, mask, rescale, density)


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
