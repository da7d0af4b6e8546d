"""Model Stock: move from the base toward the models' average by a ratio set by their angle.

Flattened, the ratio needs the Gram matrix of the task vectors: one pass. Filter-wise, each
vector along the last axis has its own ratio, computed within the chunk (chunks hold whole rows).
Both compute their cosines free of underflow, so copies of a model with tiny task vectors have
cosine 1.
"""

from __future__ import annotations

import numpy as np

from mmerge.methods._common import (
    finite_chunk,
    lifted_cosines,
    lifted_gram_blocks,
    lifted_rows,
    model_sum,
)
from mmerge.methods.contract import Pass
from mmerge.methods.registry import Param, register


def _filter_wise(job) -> bool:
    return job.params["filter_wise"] and len(job.shape) >= 2


def _ratio(xp, cos, k: int):
    """t = k cos / (1 + (k-1) cos), and 0 where the denominator is exactly 0 (cos = -1/(k-1):
    no finite ratio; stay at the base)."""
    denominator = 1.0 + (k - 1) * cos
    degenerate = denominator == 0
    return xp.where(degenerate, 0.0, k * cos / xp.where(degenerate, 1.0, denominator))


def _mean_ratio(job, cos: np.ndarray) -> float:
    """t from the mean over pairs i < j of the cosines of task vectors i and j. The norm product
    is not clamped (mergekit clamps it at 1e-6), so copies of a model with tiny task vectors
    still have cosine 1."""
    k = job.n_models
    cosines = [cos[i, j] for i in range(k) for j in range(i + 1, k)]
    return float(_ratio(np, np.float64(sum(cosines) / len(cosines)), k))


def _passes(job):
    if _filter_wise(job):
        return []

    def measure(job, chunk):
        finite_chunk(job, chunk)
        return lifted_gram_blocks(job, chunk, chunk.deltas)

    def finish(job, blocks):
        return _mean_ratio(job, lifted_cosines(blocks, job.n_models, job.compute))

    return [Pass("ratio", measure, finish)]


def _row_ratio(xp, offsets, k: int, compute: str):
    """Per row (vectors along the last axis) of 2-D task vectors: the ratio t, shape (rows, 1)."""
    offsets, squares = zip(*(lifted_rows(xp, o, compute) for o in offsets))
    norms = [xp.sqrt(s) for s in squares]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            product = norms[i] * norms[j]
            zero = product == 0
            dot = xp.sum(offsets[i] * offsets[j], axis=-1, keepdims=True)
            cosine = xp.clip(dot / xp.where(zero, 1.0, product), -1.0, 1.0)
            cosines.append(xp.where(zero, 0.0, cosine))
    return _ratio(xp, model_sum(cosines) / len(cosines), k)


@register(
    "model_stock",
    "base + t * (mean of models - base), t = k cos / (1 + (k-1) cos), cos = mean pairwise "
    "cosine of the task vectors",
    params=(Param("filter_wise", bool, False, "one ratio per vector along the last axis"),),
    passes=_passes,
    granule=lambda job: job.shape[-1] if _filter_wise(job) else 1,
    base="required",
    min_models=2,
    reference="Jang et al. 2024, Model Stock, arXiv:2403.19522",
    symmetric=True,
    self_merge={},
    tolerance=2e-4,
)
def model_stock(job, chunk):
    xp, k = chunk.xp, job.n_models
    average = model_sum(chunk.models) / k
    if not _filter_wise(job):
        t = job.stats["ratio"]
        return t * average + (1.0 - t) * chunk.base
    finite_chunk(job, chunk)
    width = job.shape[-1]
    t = _row_ratio(xp, [chunk.rows(d, width) for d in chunk.deltas], k, job.compute)
    mixed = t * chunk.rows(average, width) + (1.0 - t) * chunk.rows(chunk.base, width)
    return xp.reshape(mixed, (-1,))
