"""Passthrough: one model's tensor, optionally scaled (layer-stacking recipes)."""

from __future__ import annotations

from mmerge.methods._common import finite_result, no_base
from mmerge.methods.registry import Param, register


@register(
    "passthrough",
    "copy the single model's tensor (times scale); used by layer-stacking recipes",
    params=(Param("scale", float, 1.0, "factor applied to the tensor", per_model=True),),
    min_models=1,
    max_models=1,
    elementwise=True,
    reference="mergekit (Goddard et al. 2024, arXiv:2403.13257)",
)
def passthrough(xp, tensors, *, base, scale):
    no_base("passthrough", base)
    (factor,) = scale
    out = tensors[0] if factor == 1 else tensors[0] * factor
    return finite_result(xp, "passthrough", out, tensors, None)
