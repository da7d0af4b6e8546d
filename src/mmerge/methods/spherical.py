"""Spherical averages of many models: Multi-SLERP (one tangent-space step, mergekit) and the
Karcher (Frechet) mean on the unit sphere by fixed-point iteration. Both average directions
of the flattened tensors (or task vectors, with a base) and rescale by the weighted mean norm.
"""

from __future__ import annotations

import math
from typing import Any

from mmerge.errors import InvalidInput
from mmerge.methods import _params as P
from mmerge.methods._common import model_sum, require_finite
from mmerge.methods.registry import Param, register

Array = Any

EPS = 1e-8


def _norm(xp, x: Array) -> float:
    return float(xp.linalg.vector_norm(xp.reshape(x, (-1,))))


def _dot(xp, a: Array, b: Array) -> float:
    return float(xp.vecdot(xp.reshape(a, (-1,)), xp.reshape(b, (-1,))))


def _normalized(method: str, weight: tuple[float, ...]) -> list[float]:
    total = sum(weight)
    if abs(total) < EPS:
        raise InvalidInput(f"{method}: the weights sum to {total:g}; they cannot be normalized")
    return [w / total for w in weight]


@register(
    "multislerp",
    "barycentric spherical interpolation of any number of models (tangent space at the mean)",
    params=(
        P.WEIGHT,
        Param("normalize_weights", bool, True, "divide the weights by their sum"),
    ),
    reference="Goddard 2025, Multi-SLERP (goddard.blog); mergekit multislerp",
)
def multislerp(xp, tensors, *, base, weight, normalize_weights):
    require_finite(xp, "multislerp", tensors, base)
    if len(tensors) == 1:
        return tensors[0]
    vs = tensors if base is None else [x - base for x in tensors]
    w = _normalized("multislerp", weight) if normalize_weights else list(weight)
    norms = [_norm(xp, v) for v in vs]
    units = [v / (n + EPS) for v, n in zip(vs, norms)]
    mean = model_sum([u * wi for u, wi in zip(units, w)])
    mean_norm = _norm(xp, mean)
    if mean_norm < EPS:
        if len(vs) != 2:
            raise InvalidInput(
                "multislerp: the weighted directions cancel out (antipodal models with "
                "balancing weights); change the weights"
            )
        out = vs[0] * w[0] + vs[1] * w[1]
        return out if base is None else out + base
    mean = mean / mean_norm
    tangents = [u - _dot(xp, u, mean) * mean for u in units]
    tangent = model_sum([tv * wi for tv, wi in zip(tangents, w)])
    size = _norm(xp, tangent) + EPS
    out = mean * math.cos(size) + tangent * (math.sin(size) / size)
    out = out * sum(n * wi for n, wi in zip(norms, w))
    return out if base is None else out + base


@register(
    "karcher",
    "Karcher (Frechet) mean of the models' directions on the sphere, times the mean norm",
    params=(
        P.WEIGHT,
        Param("max_iter", int, 10, "fixed-point iterations at most", low=1, high=10000),
        Param(
            "tol",
            float,
            1e-5,
            "stop when the tangent step is below this",
            low=0.0,
            high=1.0,
            low_open=True,
        ),
    ),
    reference="Karcher 1977; Buss & Fillmore 2001, Spherical averages; mergekit karcher",
)
def karcher(xp, tensors, *, base, weight, max_iter, tol):
    require_finite(xp, "karcher", tensors, base)
    if len(tensors) == 1:
        return tensors[0]
    vs = tensors if base is None else [x - base for x in tensors]
    alphas = _normalized("karcher", weight)
    norms = [_norm(xp, v) for v in vs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        out = vs[0] * 0.0
        return out if base is None else out + base
    units = {i: vs[i] / norms[i] for i in valid}
    share = _normalized("karcher", tuple(weight[i] for i in valid))
    mean = model_sum([units[i] * a for i, a in zip(valid, share)])
    mean_norm = _norm(xp, mean)
    mean = units[valid[0]] if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        steps = []
        for i, a in zip(valid, share):
            cos = min(1.0, max(-1.0, _dot(xp, mean, units[i])))
            theta = math.acos(cos)
            if theta < tol or math.sin(theta) < EPS:  # at the mean, or antipodal: no direction
                continue
            steps.append((units[i] - cos * mean) * (a * theta / math.sin(theta)))
        if not steps:
            break
        tangent = model_sum(steps)
        size = _norm(xp, tangent)
        if size < tol:
            break
        mean = mean * math.cos(size) + tangent * (math.sin(size) / size)
        unit_norm = _norm(xp, mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    out = mean * sum(a * n for a, n in zip(alphas, norms))
    return out if base is None else out + base
