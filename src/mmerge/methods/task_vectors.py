"""Task-vector methods: task arithmetic, TIES, DARE, breadcrumbs and DELLA (linear and TIES-style).

Each is one composition of a sparsifier (`sparsify.py`: which entries of each task vector
delta_i = model_i - base survive) and a consensus rule (`consensus.py`: a weighted sum, or sign
election and disjoint mean), with the survivors rescaled in between: `base + lambda *
combine(rescale(sparsify(delta_i)))`. The composition declares the parameters of both halves
once, in mergekit's order; defaults follow mergekit 0.1.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmerge.methods import _params as P
from mmerge.methods._common import checked_first, finite_chunk, finite_result, scaled
from mmerge.methods.consensus import ELECT, SUM, Consensus, population_key
from mmerge.methods.contract import Blocks, Chunk, Job, Pass, halving_sums
from mmerge.methods.registry import MethodSpec, register
from mmerge.methods.sparsify import BAND, MAGNITUDE, RANDOM, RANK, Sparsifier, dropping

Array = Any

L1_EPS = 1e-7  # mergekit skips the L1 rescale when either sum is below this


def _rescaled(sparsifier: Sparsifier, job: Job, chunk: Chunk, i: int, kept: Array) -> Array:
    """Model i's surviving entries `kept` rescaled: l1 (sum|kept| matched to sum|delta|),
    inverse_density (divided by their keep probability), or none."""
    xp = chunk.xp
    rescale = job.params["rescale"]
    if rescale == "l1":
        factor = job.stats["l1"].factors[i]
        if factor is None:
            return kept
        if math.isfinite(factor):
            return kept * factor
        return xp.where(kept == 0, kept, kept * factor)  # 0 * inf would be NaN
    if rescale == "inverse_density":
        p = sparsifier.probability(job, chunk, i, chunk.deltas[i])
        # a float p multiplies by its reciprocal: see _common.reciprocal_note
        scaled = kept * (1.0 / p) if isinstance(p, float) else kept / p
        return xp.where(kept == 0, kept, scaled)  # 1/p may overflow: 0 * inf would be NaN
    return kept


def _keep(sparsifier: Sparsifier, job: Job, chunk: Chunk, i: int) -> Array:
    """Model i's keep mask on the chunk: the one the l1 pass held for the apply (taken, so it
    is held no longer), or found now."""
    held = job.stats.get("l1")
    mask = held.masks.pop((chunk.start, i), None) if held is not None else None
    if mask is not None and mask.shape[0] == chunk.size:
        return mask
    return sparsifier.keep(job, chunk, i, chunk.deltas[i])


def _survivors(sparsifier: Sparsifier, job: Job, chunk: Chunk, i: int) -> Array:
    """Model i's task vector on the chunk with dropped entries zeroed (before any rescale)."""
    return _zeroed(chunk.xp, chunk.deltas[i], _keep(sparsifier, job, chunk, i))


def _zeroed(xp, delta: Array, mask: Array) -> Array:
    """`delta` with the entries outside `mask` zeroed: a product with the 0/1 mask, not where():
    the same values for finite inputs (a dropped entry may be -0), and many times faster where
    the mask is irregular."""
    return delta * xp.astype(mask, delta.dtype)


@dataclass
class L1:
    """What the l1 pass found: each model's rescale factor (None: none), and the keep masks
    of one tensor's chunks, (chunk start, model) -> mask, held for its apply where the job
    may hold them (finding them may cost more than the rest of the apply: DELLA ranks rows)."""

    factors: list[float | None]
    masks: dict[tuple[int, int], Array]


def _l1_pass(sparsifier: Sparsifier, job: Job) -> Pass:
    """sum|delta_i| and sum|survivors_i| of each dropping model (fixed-order block sums)."""
    scope = job.params.get("scope") == "model"
    hold = not scope and job.holds(len(dropping(job)) * job.numel)  # a byte per mask entry

    def measure(job: Job, chunk: Chunk) -> tuple[Blocks, dict]:
        xp, columns, masks = chunk.xp, [], {}
        for i in dropping(job):
            delta = chunk.deltas[i]
            columns.append(halving_sums(xp, xp.abs(delta), job.block).rows)
            mask = sparsifier.keep(job, chunk, i, delta)
            columns.append(halving_sums(xp, xp.abs(_zeroed(xp, delta, mask)), job.block).rows)
            if hold:
                masks[(chunk.start, i)] = mask
        return Blocks(np.concatenate(columns, axis=1)), masks

    def finish(job: Job, measured: tuple[Blocks, dict]) -> L1:
        blocks, masks = measured
        totals = blocks.total()
        factors: list[float | None] = [None] * job.n_models
        for j, i in enumerate(dropping(job)):
            before, after = float(totals[2 * j]), float(totals[2 * j + 1])
            factors[i] = None if before < L1_EPS or after < L1_EPS else before / after
        return L1(factors, masks)

    def combine(a: tuple[Blocks, dict], b: tuple[Blocks, dict]) -> tuple[Blocks, dict]:
        a[1].update(b[1])
        return a[0] + b[0], a[1]

    population = ("l1", *population_key(job)) if scope else None
    return Pass("l1", measure, finish, combine, population)


def task_vector_method(
    name: str,
    description: str,
    sparsifier: Sparsifier | None,
    consensus: Consensus,
    *,
    normalize: bool,
    reference: str,
    **properties: Any,
) -> MethodSpec:
    """Register `base + lambda * consensus(rescale(sparsifier(delta_i)))` as method `name`."""
    drops = sparsifier is not None
    params = (
        P.WEIGHT,
        *(sparsifier.params if drops else ()),
        P.LAMBDA,
        P.normalize(normalize)
        if drops
        else P.normalize(normalize, "divide by the sum of the weights"),
        *consensus.params,
        *((P.rescale(sparsifier.rescale_default), *sparsifier.tail) if drops else ()),
    )

    def sparsified(job: Job, chunk: Chunk) -> list[Array]:
        deltas = chunk.deltas
        if not drops:
            return deltas
        out = list(deltas)
        for i in dropping(job):
            out[i] = _rescaled(sparsifier, job, chunk, i, _survivors(sparsifier, job, chunk, i))
        return out

    def all_passes(job: Job) -> Iterator[Pass]:
        if drops:
            yield from sparsifier.passes(job)
            if job.params["rescale"] == "l1" and dropping(job):
                yield _l1_pass(sparsifier, job)
        yield from consensus.passes(job, sparsified)

    def passes(job: Job) -> Iterator[Pass]:
        return checked_first(all_passes(job))

    def apply(job: Job, chunk: Chunk) -> Array:
        checked = bool(job.stats)  # the first pass checked every chunk
        if drops and not checked:
            finite_chunk(job, chunk)
        mixed = consensus.combine(job, chunk, sparsified(job, chunk))
        result = chunk.base + scaled(mixed, job.params["lambda"])
        return result if drops or checked else finite_result(job, chunk, result)

    return register(
        name,
        description,
        params=params,
        passes=passes,
        granule=sparsifier.granule if drops else None,
        base="required",
        random=drops and sparsifier.random,
        check=sparsifier.check if drops else None,
        reference=reference,
        **properties,
    )(apply)


_MERGE_SELF = {"density": 1.0, "normalize": True, "lambda": 1.0, "weight": 1.0}

task_arithmetic = task_vector_method(
    "task_arithmetic",
    "base + lambda * sum_i weight_i * (model_i - base); negative weights subtract a task",
    None,
    SUM,
    normalize=False,
    reference="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089",
    symmetric=True,
    exact=True,
    self_merge={"normalize": True, "lambda": 1.0, "weight": 1.0},
)

ties = task_vector_method(
    "ties",
    "TIES: trim each task vector to its top-density magnitudes, elect signs, disjoint mean",
    MAGNITUDE,
    ELECT,
    normalize=True,
    reference="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708",
    symmetric=True,
    exact=True,
    self_merge=_MERGE_SELF,
)

_DARE = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"

dare_linear = task_vector_method(
    "dare_linear",
    "DARE: drop task-vector entries at random (keep probability density), rescale, then sum",
    RANDOM,
    SUM,
    normalize=False,
    reference=_DARE,
    exact=True,
    self_merge=_MERGE_SELF,
)

dare_ties = task_vector_method(
    "dare_ties",
    "DARE drop and rescale, then TIES sign election and disjoint merge",
    RANDOM,
    ELECT,
    normalize=False,
    reference=_DARE,
    exact=True,
    self_merge=_MERGE_SELF,
)

_BREADCRUMBS = "Davari & Belilovsky 2024, Model Breadcrumbs, arXiv:2312.06795"

breadcrumbs = task_vector_method(
    "breadcrumbs",
    "Model Breadcrumbs: drop the largest outliers and the smallest entries, then sum",
    BAND,
    SUM,
    normalize=False,
    reference=_BREADCRUMBS,
    symmetric=True,
    exact=True,
    self_merge=_MERGE_SELF,
)

breadcrumbs_ties = task_vector_method(
    "breadcrumbs_ties",
    "Model Breadcrumbs trim, then TIES sign election and disjoint merge",
    BAND,
    ELECT,
    normalize=False,
    reference=_BREADCRUMBS,
    symmetric=True,
    exact=True,
    self_merge=_MERGE_SELF,
)

_DELLA = "Deep et al. 2024, DELLA-Merging (MagPrune), arXiv:2406.11617"

della = task_vector_method(
    "della",
    "DELLA: drop entries with probabilities ranked by magnitude per row, rescale, TIES merge",
    RANK,
    ELECT,
    normalize=True,
    reference=_DELLA,
    exact=True,
    self_merge=_MERGE_SELF,
)

della_linear = task_vector_method(
    "della_linear",
    "DELLA drop and rescale, then a weighted sum of the task vectors",
    RANK,
    SUM,
    normalize=False,
    reference=_DELLA,
    exact=True,
    self_merge=_MERGE_SELF,
)
