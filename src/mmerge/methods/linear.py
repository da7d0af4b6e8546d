"""Linear merge (model soup): the weighted average of the models."""

from __future__ import annotations

from mmerge.errors import InvalidInput
from mmerge.methods import _params as P
from mmerge.methods._common import finite_result, model_sum, no_base
from mmerge.methods.consensus import SUM_EPS
from mmerge.methods.registry import register


@register(
    "linear",
    "weighted average of the models (model soup); weights normalized to sum 1",
    params=(P.WEIGHT, P.normalize(True, "divide by the sum of the weights")),
    elementwise=True,
    reference="Wortsman et al. 2022, Model soups, arXiv:2203.05482",
)
def linear(xp, tensors, *, base, weight, normalize):
    no_base("linear", base)
    total = sum(weight)
    if normalize and abs(total) < SUM_EPS:
        raise InvalidInput(
            f"linear: the weights sum to {total:g}, so they cannot be normalized; "
            "change the weights or set normalize=false"
        )
    mixed = model_sum([x * w for x, w in zip(tensors, weight)])
    if normalize:
        mixed = mixed * (1.0 / total)  # see _common.reciprocal_note
    return finite_result(xp, "linear", mixed, tensors, None)
