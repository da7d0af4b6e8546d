"""Task-vector methods: task arithmetic, TIES, DARE, breadcrumbs and DELLA (linear and TIES-style).

Each takes the base and the models' task vectors delta_i = theta_i - base, sparsifies each
delta_i (except task arithmetic), combines them (weighted sum, or sign election and disjoint
mean), scales by `lambda` and adds the base back. Defaults follow mergekit 0.1.5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmerge.methods import _params as P
from mmerge.methods._common import finite_result, require_finite
from mmerge.methods.consensus import disjoint_merge, weighted_sum
from mmerge.methods.registry import register
from mmerge.methods.sparsify import (
    Survivors,
    apply_survivors,
    check_della,
    della_drop,
    magnitude,
    outlier_band,
    random_drop,
)

Array = Any


def _merge(
    xp,
    method: str,
    tensors: list[Array],
    base: Array,
    sparsify: Callable[[int, Array], Survivors | Array],
    *,
    weight: tuple[float, ...],
    normalize: bool,
    lam: float,
    election: str | None,
    prepared: list[Survivors] | None = None,
    start: int = 0,
) -> Array:
    """base + lambda * combine(sparsify(theta_i - base)); inputs must be finite.

    `prepared` holds each model's survivors decided from its whole task vector, when the
    inputs are a chunk (flat entries from `start`) of a larger tensor.
    """
    require_finite(xp, method, tensors, base)
    deltas = [x - base for x in tensors]
    kept = prepared if prepared is not None else [sparsify(i, d) for i, d in enumerate(deltas)]
    deltas = [
        apply_survivors(xp, d, k, start) if isinstance(k, Survivors) else k
        for d, k in zip(deltas, kept)
    ]
    if election is None:
        mixed = weighted_sum(xp, deltas, weight, normalize=normalize)
    else:
        mixed = disjoint_merge(xp, deltas, weight, election=election, normalize=normalize)
    return base + mixed * lam


def _sparse_body(method: str, trim: Callable[..., Survivors | Array], consensus: bool):
    """The body of a trim-then-combine method: `trim(xp, delta_i, i, **params)` per model, then
    a weighted sum, or TIES' election and disjoint mean when `consensus`."""

    def body(xp, tensors, *, base, weight, normalize, prepared=None, start=0, **params):
        return _merge(
            xp,
            method,
            tensors,
            base,
            lambda i, d: trim(xp, d, i, **params),
            weight=weight,
            normalize=normalize,
            lam=params["lambda"],
            election=params["election"] if consensus else None,
            prepared=prepared,
            start=start,
        )

    return body


def _ties_trim(xp, delta, i, *, density, rescale, **_):
    return magnitude(xp, delta, density[i], rescale)


def _dare_drop(xp, delta, i, *, density, rescale, seed, tensor_name, **_):
    return random_drop(xp, delta, density[i], rescale, seed=seed, name=tensor_name, stream=i)


def _band(xp, delta, i, *, density, gamma, rescale, **_):
    return outlier_band(xp, delta, density[i], gamma[i], rescale)


def _della_drop(method: str):
    def trim(xp, delta, i, *, density, epsilon, rescale, seed, tensor_name, **_):
        check_della(method, density, epsilon)
        return della_drop(
            xp, delta, density[i], epsilon[i], rescale, seed=seed, name=tensor_name, stream=i
        )

    return trim


@register(
    "task_arithmetic",
    "base + lambda * sum_i weight_i * (model_i - base); negative weights subtract a task",
    params=(P.WEIGHT, P.LAMBDA, P.normalize(False, "divide by the sum of the weights")),
    needs_base=True,
    elementwise=True,
    reference="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089",
)
def task_arithmetic(xp, tensors, *, base, weight, normalize, **kw):
    mixed = weighted_sum(xp, [x - base for x in tensors], weight, normalize=normalize)
    return finite_result(xp, "task_arithmetic", base + mixed * kw["lambda"], tensors, base)


ties = register(
    "ties",
    "TIES: trim each task vector to its top-density magnitudes, elect signs, disjoint mean",
    params=(
        P.WEIGHT,
        P.density(),
        P.LAMBDA,
        P.normalize(True),
        P.ELECTION,
        P.rescale("none"),
    ),
    needs_base=True,
    prepare=_ties_trim,
    reference="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708",
)(_sparse_body("ties", _ties_trim, consensus=True))

_DARE_REF = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"

dare_linear = register(
    "dare_linear",
    "DARE: drop task-vector entries at random (keep probability density), rescale, then sum",
    params=(P.WEIGHT, P.density(), P.LAMBDA, P.normalize(False), P.rescale("l1"), P.SEED),
    needs_base=True,
    random=True,
    prepare=_dare_drop,
    reference=_DARE_REF,
)(_sparse_body("dare_linear", _dare_drop, consensus=False))

dare_ties = register(
    "dare_ties",
    "DARE drop and rescale, then TIES sign election and disjoint merge",
    params=(
        P.WEIGHT,
        P.density(),
        P.LAMBDA,
        P.normalize(False),
        P.ELECTION,
        P.rescale("l1"),
        P.SEED,
    ),
    needs_base=True,
    random=True,
    prepare=_dare_drop,
    reference=_DARE_REF,
)(_sparse_body("dare_ties", _dare_drop, consensus=True))


_BREADCRUMBS_REF = "Davari & Belilovsky 2024, Model Breadcrumbs, arXiv:2312.06795"

breadcrumbs = register(
    "breadcrumbs",
    "Model Breadcrumbs: drop the largest outliers and the smallest entries, then sum",
    params=(
        P.WEIGHT,
        P.density(),
        P.GAMMA,
        P.LAMBDA,
        P.normalize(False),
        P.rescale("none"),
    ),
    needs_base=True,
    prepare=_band,
    reference=_BREADCRUMBS_REF,
)(_sparse_body("breadcrumbs", _band, consensus=False))

breadcrumbs_ties = register(
    "breadcrumbs_ties",
    "Model Breadcrumbs trim, then TIES sign election and disjoint merge",
    params=(
        P.WEIGHT,
        P.density(),
        P.GAMMA,
        P.LAMBDA,
        P.normalize(False),
        P.ELECTION,
        P.rescale("none"),
    ),
    needs_base=True,
    prepare=_band,
    reference=_BREADCRUMBS_REF,
)(_sparse_body("breadcrumbs_ties", _band, consensus=True))


_DELLA_REF = "Deep et al. 2024, DELLA-Merging (MagPrune), arXiv:2406.11617"

della = register(
    "della",
    "DELLA: drop entries with probabilities ranked by magnitude per row, rescale, TIES merge",
    params=(
        P.WEIGHT,
        P.density(),
        P.EPSILON,
        P.LAMBDA,
        P.normalize(True),
        P.ELECTION,
        P.rescale("l1"),
        P.SEED,
    ),
    needs_base=True,
    random=True,
    reference=_DELLA_REF,
)(_sparse_body("della", _della_drop("della"), consensus=True))

della_linear = register(
    "della_linear",
    "DELLA drop and rescale, then a weighted sum of the task vectors",
    params=(
        P.WEIGHT,
        P.density(),
        P.EPSILON,
        P.LAMBDA,
        P.normalize(False),
        P.rescale("l1"),
        P.SEED,
    ),
    needs_base=True,
    random=True,
    reference=_DELLA_REF,
)(_sparse_body("della_linear", _della_drop("della_linear"), consensus=False))
