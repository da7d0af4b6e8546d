"""Model Stock: move from the base toward the models' average by a ratio set by their angle."""

from __future__ import annotations

from mmerge.methods._common import model_sum, require_finite
from mmerge.methods.registry import Param, register

MIN_NORM_PRODUCT = 1e-6  # mergekit clamps |a||b| to this before dividing


def _vectors(xp, x, filter_wise: bool):
    """The vectors whose angles are measured: the flattened tensor, or (filter_wise) each
    vector along the last axis, a 1-D tensor counting as one."""
    if not filter_wise or x.ndim < 2:
        return xp.reshape(x, (1, -1))
    return x


@register(
    "model_stock",
    "base + t * (mean of models - base), t = k cos / (1 + (k-1) cos), cos = mean pairwise "
    "cosine of the task vectors",
    params=(Param("filter_wise", bool, False, "one ratio per vector along the last axis"),),
    needs_base=True,
    min_models=2,
    reference="Jang et al. 2024, Model Stock, arXiv:2403.19522",
)
def model_stock(xp, tensors, *, base, filter_wise):
    require_finite(xp, "model_stock", tensors, base)
    shape = base.shape
    offsets = [_vectors(xp, x - base, filter_wise) for x in tensors]
    norms = [xp.linalg.vector_norm(o, axis=-1, keepdims=True) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            product = norms[i] * norms[j]
            product = xp.where(product < MIN_NORM_PRODUCT, MIN_NORM_PRODUCT, product)
            dot = xp.sum(offsets[i] * offsets[j], axis=-1, keepdims=True)
            cosines.append(xp.clip(dot / product, -1.0, 1.0))
    cos = model_sum(cosines) / len(cosines)
    k = len(tensors)
    denominator = 1.0 + (k - 1) * cos
    degenerate = denominator == 0  # cos = -1/(k-1): no finite ratio; stay at the base
    t = xp.where(degenerate, 0.0, k * cos / xp.where(degenerate, 1.0, denominator))
    w0 = _vectors(xp, base, filter_wise)
    average = model_sum([_vectors(xp, x, filter_wise) for x in tensors]) / k
    return xp.reshape(t * average + (1.0 - t) * w0, shape)
