"""Combining task vectors: a weighted sum, or TIES' sign election and disjoint mean."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmerge.methods._common import model_sum

Array = Any

SUM_EPS = 1e-8  # a weight sum below this is not divided by (mergekit)


def weighted_sum(
    xp, deltas: Sequence[Array], weights: Sequence[float], *, normalize: bool
) -> Array:
    """sum_i w_i * delta_i, divided by sum_i w_i when `normalize` (and |sum| >= 1e-8)."""
    mixed = model_sum([d * w for d, w in zip(deltas, weights)])
    total = sum(weights)
    if normalize and abs(total) >= SUM_EPS:
        mixed = mixed * (1.0 / total)  # see _common.reciprocal_note
    return mixed


def elect(votes: Sequence[Array], election: str, xp) -> Array:
    """True where the elected sign is + : sign of the sum of `votes` (or of their signs for
    `count`); an exact zero counts as +."""
    if election == "count":
        return model_sum([xp.sign(v) for v in votes]) >= 0
    return model_sum(votes) >= 0


def disjoint_merge(
    xp,
    deltas: Sequence[Array],
    weights: Sequence[float],
    *,
    election: str,
    normalize: bool,
) -> Array:
    """TIES: elect a sign per entry, then sum the weighted entries that agree with it, divided
    by the sum of their weights when `normalize` (0 where no model agrees).

    `weighted_sum` and `count` vote with the weighted deltas (mergekit); `sum` votes with the
    unweighted ones (the paper). An entry agrees when its voting value has the elected sign, so
    exact zeros (trimmed or dropped entries) never agree.
    """
    weighted = [d * w for d, w in zip(deltas, weights)]
    votes = deltas if election == "sum" else weighted
    positive = elect(votes, election, xp)
    negative = ~positive
    # boolean logic and products with 0/1 masks rather than where(): same values for finite
    # inputs, and many times faster on irregular masks
    agree = [
        xp.astype((positive & (v > 0)) | (negative & (v < 0)), weighted[0].dtype) for v in votes
    ]
    mixed = model_sum([m * wd for m, wd in zip(agree, weighted)])
    if normalize:
        divisor = model_sum([m * w for m, w in zip(agree, weights)])
        mixed = mixed / xp.where(divisor == 0, 1.0, divisor)
    return mixed
