"""NearSwap: take the other model's value where the two are close, keep the first elsewhere."""

from __future__ import annotations

from mmerge.methods._common import as_array, finite_result, pair
from mmerge.methods.registry import Param, register


@register(
    "nearswap",
    "per entry w = clamp(t / |a - b|, 0, 1); result w * b + (1 - w) * a",
    params=(
        Param(
            "t",
            float,
            0.0001,
            "sameness threshold: entries closer than t take the other model's value",
            low=0.0,
            low_open=True,
        ),
    ),
    min_models=1,
    max_models=2,
    elementwise=True,
    reference="alchemonaut, QuartetAnemoi-70B-t0.0001 (Hugging Face model card); mergekit",
)
def nearswap(xp, tensors, *, base, t):
    a, b = pair("nearswap", tensors, base)
    diff = xp.abs(a - b)
    close = diff > 0
    ratio = as_array(xp, t, diff) / xp.where(close, diff, 1.0)  # array / array: IEEE division
    w = xp.where(close, xp.clip(ratio, 0.0, 1.0), 1.0)
    return finite_result(xp, "nearswap", w * b + (1.0 - w) * a, tensors, base)
