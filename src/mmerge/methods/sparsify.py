"""Task-vector sparsifiers: magnitude trim (TIES), outlier band (breadcrumbs), random drop (DARE),
rank-adaptive drop (DELLA). A `Sparsifier` is the first half of every task-vector method
(`task_vectors.py`): its own parameters, the passes that find what it needs from whole tensors
(the exact trim thresholds), and which entries of one chunk of model i's task vector survive.
Rescaling the survivors is shared by all of them and lives with the composition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mmerge import backend
from mmerge.backend import rng
from mmerge.errors import InvalidInput
from mmerge.methods import _params as P
from mmerge.methods.consensus import population_key
from mmerge.methods.contract import Chunk, Job, Pass
from mmerge.methods.registry import Param
from mmerge.methods.select import Selection

Array = Any

Keep = Callable[[Job, Chunk, int, Array], Array]  # (job, chunk, model, task vector) -> mask
Probability = Callable[[Job, Chunk, int, Array], "float | Array"]


@dataclass(frozen=True)
class Sparsifier:
    """How a task-vector method drops entries: `params` follow the weights, `tail` comes last;
    `keep` gives the mask of model i's surviving entries in a chunk (only called for models
    with density < 1), `probability` their keep probability (for `inverse_density`); `check`
    refuses parameters invalid together (see `MethodSpec.check`)."""

    name: str
    params: tuple[Param, ...]
    tail: tuple[Param, ...]
    rescale_default: str
    keep: Keep
    probability: Probability
    passes: Callable[[Job], Iterator[Pass]] = lambda job: iter(())
    granule: Callable[[Job], int] | None = None
    random: bool = False
    check: Callable[[str, dict[str, Any]], None] | None = None


def dropping(job: Job) -> list[int]:
    """The models whose task vectors lose entries (density < 1)."""
    return [i for i, d in enumerate(job.params["density"]) if d < 1]


def top_count(density: float, n: int) -> int:
    """How many of n entries a top-`density` trim keeps: max(1, int(density * n)), as mergekit."""
    if density >= 1:
        return n
    return min(n, max(1, int(density * n)))


def _model_scope(job: Job) -> bool:
    return job.params.get("scope") == "model"


def _magnitudes(job: Job, chunk: Chunk) -> list[Array]:
    return [chunk.xp.abs(d) for d in chunk.deltas]


def _population(job: Job):
    return ("trim", *population_key(job)) if _model_scope(job) else None


# -- magnitude (TIES) ----------------------------------------------------------------------------


def _magnitude_counts(
    job: Job, sizes: list[int], nonzero: list[int] | None
) -> list[tuple[int, ...]]:
    """k per model: max(1, int(density n)) for one tensor (mergekit, ties cut by flat index);
    for the whole model, the TIES reference code's count int(density n) + 1 (ties kept)."""
    out = []
    for d, n in zip(job.params["density"], sizes):
        if d >= 1:
            out.append((n,))
        elif _model_scope(job):
            out.append((int(d * n) + 1,))
        else:
            out.append((top_count(d, n),))
    return out


def _selection(job: Job, counts) -> Selection:
    return Selection(
        "trim",
        _magnitudes,
        counts,
        ties="all" if _model_scope(job) else "index",
        population=_population,
    )


def _magnitude_passes(job: Job) -> Iterator[Pass]:
    if dropping(job):
        yield from _selection(job, _magnitude_counts).passes(job)


def _magnitude_keep(job: Job, chunk: Chunk, i: int, delta: Array) -> Array:
    return _selection(job, _magnitude_counts).mask(job, chunk, chunk.xp.abs(delta), i)


MAGNITUDE = Sparsifier(
    "magnitude",
    (P.density(),),
    (P.SCOPE,),
    "none",
    _magnitude_keep,
    lambda job, chunk, i, delta: job.params["density"][i],
    _magnitude_passes,
)


# -- band (breadcrumbs) --------------------------------------------------------------------------


def band_sizes(density: float, gamma: float, n: int) -> tuple[int, int]:
    """(outliers dropped, entries kept): int(gamma n) largest dropped, reduced so that the next
    int(density n) fit; those are kept."""
    keep = int(density * n)
    return min(int(gamma * n), n - keep), keep


def _band_counts(job: Job, sizes: list[int], nonzero: list[int] | None) -> list[tuple[int, ...]]:
    """Per model: (skip + keep, skip), the two selections whose difference is the band."""
    out = []
    for d, g, n in zip(job.params["density"], job.params["gamma"], sizes):
        skip, keep = band_sizes(d, g, n) if d < 1 else (0, n)
        out.append((skip + keep, skip))
    return out


def _band_passes(job: Job) -> Iterator[Pass]:
    if dropping(job):
        yield from _selection(job, _band_counts).passes(job)


def _band_keep(job: Job, chunk: Chunk, i: int, delta: Array) -> Array:
    xp, selection = chunk.xp, _selection(job, _band_counts)
    magnitude = xp.abs(delta)
    inner = selection.mask(job, chunk, magnitude, i, 0)
    if selection.cuts(job)[i][1].keep_none:
        return inner
    return xp.logical_and(inner, xp.logical_not(selection.mask(job, chunk, magnitude, i, 1)))


BAND = Sparsifier(
    "band",
    (P.density(), P.GAMMA),
    (P.SCOPE,),
    "none",
    _band_keep,
    lambda job, chunk, i, delta: job.params["density"][i],
    _band_passes,
)


# -- random drop (DARE) --------------------------------------------------------------------------


def _keys(job: Job, i: int) -> tuple[int, int]:
    return rng.stream_keys(job.params["seed"], job.tensor_name, i)


def _random_keep(job: Job, chunk: Chunk, i: int, delta: Array) -> Array:
    cut = rng.keep_threshold(job.params["density"][i])
    return backend.of(delta).keep_mask(chunk.size, cut, _keys(job, i), chunk.start)


RANDOM = Sparsifier(
    "random",
    (P.density(),),
    (P.SEED,),
    "l1",
    _random_keep,
    lambda job, chunk, i, delta: job.params["density"][i],
    random=True,
)


# -- rank-adaptive drop (DELLA) -------------------------------------------------------------------


def _check_della(method: str, params: dict[str, Any]) -> None:
    """DELLA's keep probabilities density +/- epsilon must lie in (0, 1] for every model."""
    for i, (d, e) in enumerate(zip(params["density"], params["epsilon"])):
        if d < 1 and not (d - e > 0 and d + e <= 1):
            raise InvalidInput(
                f"{method}: model {i} needs density - epsilon > 0 and density + "
                f"epsilon <= 1, got density {d:g}, epsilon {e:g}"
            )


def _della_granule(job: Job) -> int:
    """Ranks run along axis 1 (mergekit's rule): chunks hold whole slices along axis 0; a
    tensor of rank <= 1 is one row."""
    return math.prod(job.shape[1:]) if len(job.shape) >= 2 else job.numel


def _della_probability(job: Job, chunk: Chunk, i: int, delta: Array) -> float | Array:
    """(density - eps) + 2 eps rank / (n - 1), rank the ascending |delta| rank along axis 1
    (lower index first among equals); density itself for rows of one entry."""
    tables = _della_tables(job, chunk, i, delta)
    if tables is None:
        return job.params["density"][i]
    return chunk.xp.take(tables[0], _della_rank(job, chunk, i, delta))


def _della_keep(job: Job, chunk: Chunk, i: int, delta: Array) -> Array:
    tables = _della_tables(job, chunk, i, delta)
    if tables is None:
        cut: int | Array = rng.keep_threshold(job.params["density"][i])
    else:
        cut = chunk.xp.take(tables[1], _della_rank(job, chunk, i, delta))
    return backend.of(delta).keep_mask(chunk.size, cut, _keys(job, i), chunk.start)


def _della_lines(job: Job, chunk: Chunk) -> tuple[int, int, int]:
    """The chunk as (rows, n, trailing): ranks run along the n entries of axis 1."""
    if len(job.shape) >= 2:
        return (-1, job.shape[1], _della_granule(job) // job.shape[1])
    return (1, chunk.size, 1)


def _della_rank(job: Job, chunk: Chunk, i: int, delta: Array) -> Array:
    """The flat ranks of model i's |delta| on the chunk, found once per chunk (the drop and the
    inverse_density rescale share them)."""
    key = ("della.rank", i)
    if key not in chunk.memo:
        xp = chunk.xp
        lines = xp.abs(xp.reshape(delta, _della_lines(job, chunk)))
        chunk.memo[key] = xp.reshape(backend.of(delta).ranks(lines, axis=1), (-1,))
    return chunk.memo[key]


def _della_tables(job: Job, chunk: Chunk, i: int, delta: Array) -> tuple[Array, Array] | None:
    """(keep probability, keep cut of `backend.rng`) of each rank 0 .. n-1, so that each entry
    looks its own up by rank: the same arithmetic, on n values rather than on every entry.
    None for rows of one entry."""
    n = _della_lines(job, chunk)[1]
    if n == 1:
        return None
    key = ("della.tables", i)
    if key not in chunk.memo:
        xp = chunk.xp
        density, epsilon = job.params["density"][i], job.params["epsilon"][i]
        rank = xp.astype(xp.arange(n, device=backend.device_of(delta)), delta.dtype) / (n - 1)
        prob = xp.clip((density - epsilon) + (rank * 2.0) * epsilon, 0.0, 1.0)
        cut = xp.astype(xp.floor(prob * float(1 << rng.BITS)), xp.int64)
        chunk.memo[key] = (prob, cut)
    return chunk.memo[key]


RANK = Sparsifier(
    "rank",
    (P.density(), P.EPSILON),
    (P.SEED,),
    "l1",
    _della_keep,
    _della_probability,
    granule=_della_granule,
    random=True,
    check=_check_della,
)
