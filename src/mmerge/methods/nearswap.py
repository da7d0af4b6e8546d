"""NearSwap: take the other model's value where the two are close, keep the first elsewhere."""

from __future__ import annotations

import numpy as np

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
    # where a = b, t / 0 is +inf in IEEE division and clamps to w = 1: no where() needed; t
    # over a tiny difference overflows to +inf the same way, which numpy would warn of
    with np.errstate(divide="ignore", over="ignore"):
        w = xp.clip(as_array(xp, job.params["t"], diff) / diff, 0.0, 1.0)
    return finite_result(job, chunk, w * b + (1.0 - w) * a)
