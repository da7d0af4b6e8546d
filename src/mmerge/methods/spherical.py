"""Spherical averages of many models: Multi-SLERP (one tangent-space step, mergekit) and the
Karcher (Frechet) mean on the unit sphere by fixed-point iteration. Both average directions
of the flattened tensors (or task vectors, with a base) and rescale by the weighted mean norm.

Every vector either method builds (unit vectors, means, tangents) is a combination of the
inputs, so one pass over the tensor measuring the Gram matrix G_ij = v_i . v_j is enough: the
iteration runs on the k coefficients in float64, and the apply is `sum_i c_i v_i`. No tensor is
held, however large, and the iteration costs nothing per entry.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mmerge.errors import InvalidInput
from mmerge.methods import _params as P
from mmerge.methods._common import combination, finite_chunk, gram_blocks, gram_matrix, vectors
from mmerge.methods.contract import Pass
from mmerge.methods.registry import Param, register

Array = Any

EPS = 1e-8
ANTIPODAL_SIN = 1e-3  # a model this close to the opposite of the mean (0.06 degrees) has no
# defined direction from it; float32 rounding leaves exactly opposite inputs about 1e-4 off


def _normalized(method: str, weight: tuple[float, ...]) -> list[float]:
    total = sum(weight)
    if abs(total) < EPS:
        raise InvalidInput(f"{method}: the weights sum to {total:g}; they cannot be normalized")
    return [w / total for w in weight]


def _check_weights(method: str, params: dict) -> None:
    """Weights to be normalized must not sum to 0 (checked when the plan is built)."""
    if params.get("normalize_weights", True):
        _normalized(method, params["weight"])


def _gram_pass(finish):
    """The one pass of both methods: the Gram matrix of the vectors, then `finish(job, G)`."""

    def measure(job, chunk):
        finite_chunk(job, chunk)
        return gram_blocks(job, chunk, vectors(chunk))

    return Pass(
        "coefficients", measure, lambda job, b: finish(job, gram_matrix(b.total(), job.n_models))
    )


def _apply(job, chunk):
    """sum_i c_i v_i (plus the base); one model is returned as it is."""
    if job.n_models == 1:
        return chunk.models[0]
    out = combination(chunk.xp, vectors(chunk), job.stats["coefficients"])
    return out if chunk.base is None else out + chunk.base


def _quadratic(g: np.ndarray, a: np.ndarray) -> float:
    """|sum_i a_i v_i|^2 from the Gram matrix."""
    return max(0.0, float(a @ g @ a))


# -- multislerp ---------------------------------------------------------------------------------


def _multislerp(job, g: np.ndarray) -> list[float]:
    k = job.n_models
    if k == 1:
        return [1.0]
    weight = job.params["weight"]
    w = np.array(
        _normalized("multislerp", weight) if job.params["normalize_weights"] else weight, float
    )
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    unit = w / (norms + EPS)  # mean = sum_i unit_i v_i
    mean_norm = math.sqrt(_quadratic(g, unit))
    if mean_norm < EPS:
        if k != 2:
            raise InvalidInput(
                "multislerp: the weighted directions cancel out (antipodal models with "
                "balancing weights); change the weights"
            )
        return [float(w[0]), float(w[1])]
    mean = unit / mean_norm  # the unit mean direction
    along = (g @ mean) / (norms + EPS)  # u_i . mean
    tangent = w / (norms + EPS) - float(w @ along) * mean  # sum_i w_i (u_i - (u_i . mean) mean)
    size = math.sqrt(_quadratic(g, tangent)) + EPS
    scale = float(w @ norms)
    return list((mean * math.cos(size) + tangent * (math.sin(size) / size)) * scale)


@register(
    "multislerp",
    "barycentric spherical interpolation of any number of models (tangent space at the mean)",
    params=(
        P.WEIGHT,
        Param("normalize_weights", bool, True, "divide the weights by their sum"),
    ),
    passes=lambda job: [] if job.n_models == 1 else [_gram_pass(_multislerp)],
    base="optional",
    reference="Goddard 2025, Multi-SLERP (goddard.blog); mergekit multislerp",
    symmetric=True,
    self_merge={"normalize_weights": True},
    tolerance=2e-4,
    check=_check_weights,
)
def multislerp(job, chunk):
    if job.n_models == 1:
        finite_chunk(job, chunk)
    return _apply(job, chunk)


# -- karcher ------------------------------------------------------------------------------------


def _karcher(job, g: np.ndarray) -> list[float]:
    k = job.n_models
    if k == 1:
        return [1.0]
    tol, weight = job.params["tol"], job.params["weight"]
    alphas = np.array(_normalized("karcher", weight))
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:  # no direction anywhere: the weighted mean of the vectors
        return list(alphas)
    share = np.zeros(k)
    share[valid] = _normalized("karcher", tuple(weight[i] for i in valid))
    units = np.zeros((k, k))  # row i: the coefficients of u_i = v_i / |v_i|
    units[valid, valid] = 1.0 / norms[valid]
    u = units @ g @ units.T  # u_i . u_j
    mean = share.copy()  # coefficients over the units
    size = math.sqrt(_quadratic(u, mean))
    if size < tol:
        mean = np.zeros(k)
        mean[valid[0]] = 1.0
    else:
        mean /= size
    for _ in range(job.params["max_iter"]):
        tangent = np.zeros(k)
        moved = False
        for i in valid:
            cos = min(1.0, max(-1.0, float(u[i] @ mean)))
            theta = math.acos(cos)
            sin = math.sin(theta)
            if theta < tol or (cos < 0 and sin < ANTIPODAL_SIN):  # at the mean, or opposite it
                continue
            step = share[i] * theta / sin
            tangent -= step * cos * mean
            tangent[i] += step
            moved = True
        if not moved:
            break
        size = math.sqrt(_quadratic(u, tangent))
        if size < tol:
            break
        mean = mean * math.cos(size) + tangent * (math.sin(size) / size)
        unit_norm = math.sqrt(_quadratic(u, mean))
        if unit_norm > tol:
            mean /= unit_norm
    scale = float(alphas @ norms)
    coefficients = np.zeros(k)
    coefficients[valid] = mean[valid] / norms[valid] * scale
    return list(coefficients)


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
    passes=lambda job: [] if job.n_models == 1 else [_gram_pass(_karcher)],
    base="optional",
    reference="Karcher 1977; Buss & Fillmore 2001, Spherical averages; mergekit karcher",
    symmetric=True,
    self_merge={},
    tolerance=2e-4,
    check=_check_weights,
)
def karcher(job, chunk):
    if job.n_models == 1:
        finite_chunk(job, chunk)
    return _apply(job, chunk)
