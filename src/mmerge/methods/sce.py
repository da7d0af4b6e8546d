"""SCE (FuseChat): Select high-variance entries, Calculate per-model weights, Erase minority
signs, then a weighted disjoint mean of the task vectors.

Streamed: the exact top-k of the variance comes from the selection passes (`select.py`), the
weights from one pass of block sums, then every chunk is merged with them."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmerge.methods._common import checked_first, model_sum
from mmerge.methods.consensus import disjoint_merge
from mmerge.methods.contract import Blocks, Chunk, Job, Pass, halving_sums
from mmerge.methods.registry import Param, register
from mmerge.methods.select import Selection

Array = Any


def sorted_values(xp, arrays: list[Array]) -> list[Array]:
    """The arrays' values sorted entry by entry (an odd-even transposition network of
    minimum/maximum), so that sums over them do not depend on the models' order."""
    out = list(arrays)
    m = len(out)
    for step in range(m):
        for i in range(step % 2, m - 1, 2):
            out[i], out[i + 1] = xp.minimum(out[i], out[i + 1]), xp.maximum(out[i], out[i + 1])
    return out


def variance(xp, deltas: list[Array]) -> Array:
    """The population variance across models per entry, the same bits in any model order."""
    ordered = sorted_values(xp, deltas)
    scale = 1.0 / len(ordered)  # see _common.reciprocal_note
    mean = model_sum(ordered) * scale
    return model_sum([(d - mean) * (d - mean) for d in ordered]) * scale


def _select_counts(job: Job, sizes: list[int], nonzero: list[int]) -> list[tuple[int, ...]]:
    """k = int(select_topk * the number of entries with non-zero variance)."""
    return [(int(job.params["select_topk"] * nonzero[0]),)]


SELECT = Selection(
    "select",
    lambda job, chunk: [variance(chunk.xp, chunk.deltas)],
    _select_counts,
    streams=lambda job: 1,
    nonzero=True,
)


def _selecting(job: Job) -> bool:
    return job.params["select_topk"] < 1


def _selected(job: Job, chunk: Chunk) -> list[Array]:
    """The chunk's task vectors, zeroed outside the selected entries."""
    deltas = chunk.deltas
    if not _selecting(job):
        return deltas
    xp = chunk.xp
    keep = SELECT.mask(job, chunk, variance(xp, deltas), 0)
    mask = xp.astype(keep, deltas[0].dtype)
    return [d * mask for d in deltas]


def _energy(job: Job, chunk: Chunk) -> Blocks:
    xp = chunk.xp
    columns = [halving_sums(xp, d * d, job.block).rows for d in _selected(job, chunk)]
    return Blocks(np.concatenate(columns, axis=1))


def _weights(job: Job, blocks: Blocks) -> list[float]:
    """w_i = mean(d_i^2), divided by their sum (equal weights if the sum is 0)."""
    energy = [float(e) / job.numel for e in blocks.total()]
    total = sum(energy)
    m = job.n_models
    return [1.0 / m] * m if total == 0 else [e / total for e in energy]


def _passes(job: Job):
    if _selecting(job):
        yield from SELECT.passes(job)
    yield Pass("weights", _energy, _weights)


@register(
    "sce",
    "select the top select_topk fraction of entries by variance across models, weight each "
    "model by its mean squared task vector, erase minority signs, disjoint mean",
    params=(
        Param(
            "select_topk",
            float,
            1.0,
            "fraction of entries (among those with non-zero variance) kept",
            low=0.0,
            high=1.0,
            low_open=True,
        ),
    ),
    passes=lambda job: checked_first(_passes(job)),
    base="required",
    reference="Wan et al. 2024, FuseChat (SCE merging), arXiv:2408.07990",
    symmetric=True,
    exact=True,
    self_merge={"select_topk": 1.0},
)
def sce(job, chunk):
    mixed = disjoint_merge(
        chunk.xp, _selected(job, chunk), job.stats["weights"], election="sum", normalize=True
    )
    return chunk.base + mixed
