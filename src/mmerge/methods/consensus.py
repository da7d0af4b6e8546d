"""Combining sparsified task vectors: a weighted sum, or TIES' sign election and disjoint mean.

A `Consensus` is the second half of every task-vector method (`task_vectors.py`): its own
parameters, any passes it needs (the whole model's majority sign, for `scope: model`), and the
combination of one chunk's task vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mmerge.methods import _params as P
from mmerge.methods._common import combination, model_sum, scaled
from mmerge.methods.contract import Chunk, Job, Pass
from mmerge.methods.registry import Param

Array = Any

SUM_EPS = 1e-8  # a weight sum below this is not divided by (mergekit)


def weighted_sum(
    xp, deltas: Sequence[Array], weights: Sequence[float], *, normalize: bool
) -> Array:
    """sum_i w_i * delta_i, divided by sum_i w_i when `normalize` (and |sum| >= 1e-8)."""
    mixed = combination(xp, deltas, weights)
    total = sum(weights)
    if normalize and abs(total) >= SUM_EPS:
        mixed = mixed * (1.0 / total)  # see _common.reciprocal_note
    return mixed


def votes(deltas: Sequence[Array], weights: Sequence[float], election: str) -> list[Array]:
    """What each model votes with: its weighted task vector (`weighted_sum`, `count`, mergekit)
    or its task vector alone (`sum`, the TIES paper)."""
    return list(deltas) if election == "sum" else [scaled(d, w) for d, w in zip(deltas, weights)]


def mass(xp, ballots: Sequence[Array], election: str) -> Array:
    """The summed vote per entry (of the signs, for `count`), in model order."""
    if election == "count":
        return model_sum([xp.sign(v) for v in ballots])
    return model_sum(ballots)


def disjoint_merge(
    xp,
    deltas: Sequence[Array],
    weights: Sequence[float],
    *,
    election: str,
    normalize: bool,
    zero_positive: bool = True,
) -> Array:
    """TIES: elect a sign per entry, then sum the weighted entries that agree with it, divided
    by the sum of their weights when `normalize` (0 where no model agrees).

    The elected sign is that of the summed vote, and `zero_positive` decides entries whose vote
    sums to exactly 0 (+ by default; the whole model's majority sign for `scope: model`). An
    entry agrees when its vote has the elected sign, so exact zeros (trimmed or dropped entries)
    never agree.
    """
    weighted = [scaled(d, w) for d, w in zip(deltas, weights)]
    ballots = deltas if election == "sum" else weighted
    total = mass(xp, ballots, election)
    positive = xp.greater_equal(total, 0.0) if zero_positive else xp.greater(total, 0.0)
    negative = xp.logical_not(positive)
    # boolean logic and products with 0/1 masks rather than where(): same values for finite
    # inputs, and many times faster on irregular masks; comparisons and logic by the
    # namespace's functions, not operators, so that a backend may run them on its fastest
    # kernels (torch's CPU: numpy's comparisons; MLX's CPU: logic on the masks' bytes)
    agree = [
        xp.astype(
            xp.logical_or(
                xp.logical_and(positive, xp.greater(v, 0.0)),
                xp.logical_and(negative, xp.less(v, 0.0)),
            ),
            v.dtype,
        )
        for v in ballots
    ]
    mixed = model_sum([m * wd for m, wd in zip(agree, weighted)])
    if normalize:
        divisor = model_sum([scaled(m, w) for m, w in zip(agree, weights)])
        # 1 where no weight agrees: adding the 0/1 mask is exact, and many times faster than
        # where() on an irregular mask
        mixed = mixed / (divisor + xp.astype(xp.equal(divisor, 0.0), divisor.dtype))
    return mixed


Sparsified = Callable[[Job, Chunk], list[Array]]  # a chunk's task vectors after the drop


@dataclass(frozen=True)
class Consensus:
    """How a task-vector method combines its sparsified task vectors."""

    name: str
    params: tuple[Param, ...]
    combine: Callable[[Job, Chunk, list[Array]], Array]
    passes: Callable[[Job, Sparsified], Iterator[Pass]] = lambda job, sparsified: iter(())


def _sum(job: Job, chunk: Chunk, deltas: list[Array]) -> Array:
    return weighted_sum(chunk.xp, deltas, job.params["weight"], normalize=job.params["normalize"])


def _model_scope(job: Job) -> bool:
    return job.params.get("scope") == "model"


def _elect(job: Job, chunk: Chunk, deltas: list[Array]) -> Array:
    zero_positive = job.stats["majority"] > 0 if _model_scope(job) else True
    return disjoint_merge(
        chunk.xp,
        deltas,
        job.params["weight"],
        election=job.params["election"],
        normalize=job.params["normalize"],
        zero_positive=zero_positive,
    )


def _majority(job: Job, sparsified: Sparsified) -> Iterator[Pass]:
    """With `scope: model`, entries whose vote sums to 0 take the whole model's majority sign
    (the TIES paper): one pass counting entries with a positive minus a negative summed vote."""
    if not _model_scope(job):
        return

    def measure(job: Job, chunk: Chunk) -> int:
        xp, election = chunk.xp, job.params["election"]
        total = mass(xp, votes(sparsified(job, chunk), job.params["weight"], election), election)
        return int(xp.count_nonzero(total > 0)) - int(xp.count_nonzero(total < 0))

    yield Pass("majority", measure, population=("majority", *population_key(job)))


def population_key(job: Job) -> tuple:
    """What tensors merged with `scope: model` share: the method and every parameter value."""
    return (job.method.name, job.n_models, tuple(sorted(job.params.items())))


SUM = Consensus("sum", (), _sum)
ELECT = Consensus("elect", (P.ELECTION,), _elect, _majority)
