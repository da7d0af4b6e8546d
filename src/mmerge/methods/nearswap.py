"""NearSwap: take the other model's value where the two are close, keep the first elsewhere."""

from __future__ import annotations

from mmerge.methods._common import as_array, endpoints, finite_result
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
    base="endpoint",
    min_models=2,
    max_models=2,
    reference="alchemonaut, QuartetAnemoi-70B-t0.0001 (Hugging Face model card); mergekit",
    exact=True,
    self_merge={},
)
def nearswap(job, chunk):
    xp = chunk.xp
    a, b = endpoints(chunk)
    diff = xp.abs(a - b)
    close = diff > 0
    ratio = as_array(xp, job.params["t"], diff) / xp.where(close, diff, 1.0)  # IEEE division
    w = xp.where(close, xp.clip(ratio, 0.0, 1.0), 1.0)
    return finite_result(job, chunk, w * b + (1.0 - w) * a)
