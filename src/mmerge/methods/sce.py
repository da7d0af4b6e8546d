"""SCE (FuseChat): Select high-variance entries, Calculate per-model weights, Erase minority
signs, then a weighted disjoint mean of the task vectors."""

from __future__ import annotations

import math

from mmerge.backend import topk
from mmerge.methods._common import fixed_order_sum, model_sum, require_finite
from mmerge.methods.consensus import disjoint_merge
from mmerge.methods.registry import Param, register


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
    needs_base=True,
    reference="Wan et al. 2024, FuseChat (SCE merging), arXiv:2408.07990",
)
def sce(xp, tensors, *, base, select_topk):
    require_finite(xp, "sce", tensors, base)
    deltas = [x - base for x in tensors]
    m = len(deltas)
    if select_topk < 1:
        mean = model_sum(deltas) * (1.0 / m)  # see _common.reciprocal_note
        variance = model_sum([(d - mean) * (d - mean) for d in deltas]) * (1.0 / m)
        nonzero = int(xp.count_nonzero(variance))
        keep = topk.top_mask(xp, variance, int(select_topk * nonzero))
        deltas = [xp.where(keep, d, 0.0) for d in deltas]
    size = math.prod(base.shape)
    energy = [fixed_order_sum(xp, d * d) / size for d in deltas]
    total = sum(energy)
    weights = [1.0 / m] * m if total == 0 else [e / total for e in energy]
    return base + disjoint_merge(xp, deltas, weights, election="sum", normalize=True)
