"""Passthrough: one model's tensor, optionally scaled (layer-stacking recipes)."""

from __future__ import annotations

from mmerge.methods._common import finite_result, scaled
from mmerge.methods.registry import Param, register


@register(
    "passthrough",
    "copy the single model's tensor (times scale); used by layer-stacking recipes",
    params=(Param("scale", float, 1.0, "factor applied to the tensor", per_model=True),),
    min_models=1,
    max_models=1,
    copies=lambda params: params["scale"] == (1,),
    reference="mergekit (Goddard et al. 2024, arXiv:2403.13257)",
    exact=True,
    self_merge={"scale": 1.0},
)
def passthrough(job, chunk):
    (scale,) = job.params["scale"]
    return finite_result(job, chunk, scaled(chunk.models[0], scale))
