"""Linear merge (model soup): the weighted average of the models."""

from __future__ import annotations

from mmerge.errors import InvalidInput
from mmerge.methods import _params as P
from mmerge.methods._common import combination, finite_result
from mmerge.methods.consensus import SUM_EPS
from mmerge.methods.registry import register


def _check(method: str, params: dict) -> None:
    """Weights to be normalized must not sum to 0 (checked when the plan is built)."""
    total = sum(params["weight"])
    if params["normalize"] and abs(total) < SUM_EPS:
        raise InvalidInput(
            f"{method}: the weights sum to {total:g}, so they cannot be normalized; "
            "change the weights or set normalize=false"
        )


@register(
    "linear",
    "weighted average of the models (model soup); weights normalized to sum 1",
    params=(P.WEIGHT, P.normalize(True, "divide by the sum of the weights")),
    reference="Wortsman et al. 2022, Model soups, arXiv:2203.05482",
    symmetric=True,
    exact=True,
    self_merge={"normalize": True},
    check=_check,
)
def linear(job, chunk):
    weight, normalize = job.params["weight"], job.params["normalize"]
    total = sum(weight)
    mixed = combination(chunk.xp, chunk.models, weight)
    if normalize:
        mixed = mixed * (1.0 / total)  # see _common.reciprocal_note
    return finite_result(job, chunk, mixed)
