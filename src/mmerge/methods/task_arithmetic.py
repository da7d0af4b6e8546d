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
    sparsify: Callable[[int, Array], Array],
    *,
    weight: tuple[float, ...],
    normalize: bool,
    lam: float,
    election: str | None,
) -> Array:
    """base + lambda * combine(sparsify(theta_i - base)); inputs must be finite."""
    require_finite(xp, method, tensors, base)
    deltas = [sparsify(i, x - base) for i, x in enumerate(tensors)]
    if election is None:
        mixed = weighted_sum(xp, deltas, weight, normalize=normalize)
    else:
        mixed = disjoint_merge(xp, deltas, weight, election=election, normalize=normalize)
    return base + mixed * lam


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


@register(
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
    reference="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708",
)
def ties(xp, tensors, *, base, weight, density, normalize, election, rescale, **kw):
    return _merge(
        xp,
        "ties",
        tensors,
        base,
        lambda i, d: magnitude(xp, d, density[i], rescale),
        weight=weight,
        normalize=normalize,
        lam=kw["lambda"],
        election=election,
    )


def _dare(method: str, consensus: bool):
    def body(xp, tensors, *, base, weight, density, normalize, rescale, seed, tensor_name, **kw):
        def drop(i, d):
            return random_drop(xp, d, density[i], rescale, seed=seed, name=tensor_name, stream=i)

        return _merge(
            xp,
            method,
            tensors,
            base,
            drop,
            weight=weight,
            normalize=normalize,
            lam=kw["lambda"],
            election=kw["election"] if consensus else None,
        )

    return body


_DARE_REF = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"

dare_linear = register(
    "dare_linear",
    "DARE: drop task-vector entries at random (keep probability density), rescale, then sum",
    params=(P.WEIGHT, P.density(), P.LAMBDA, P.normalize(False), P.rescale("l1"), P.SEED),
    needs_base=True,
    random=True,
    reference=_DARE_REF,
)(_dare("dare_linear", consensus=False))

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
    reference=_DARE_REF,
)(_dare("dare_ties", consensus=True))


def _breadcrumbs(method: str, consensus: bool):
    def body(xp, tensors, *, base, weight, density, gamma, normalize, rescale, **kw):
        return _merge(
            xp,
            method,
            tensors,
            base,
            lambda i, d: outlier_band(xp, d, density[i], gamma[i], rescale),
            weight=weight,
            normalize=normalize,
            lam=kw["lambda"],
            election=kw["election"] if consensus else None,
        )

    return body


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
    reference=_BREADCRUMBS_REF,
)(_breadcrumbs("breadcrumbs", consensus=False))

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
    reference=_BREADCRUMBS_REF,
)(_breadcrumbs("breadcrumbs_ties", consensus=True))


def _della(method: str, consensus: bool):
    def body(
        xp, tensors, *, base, weight, density, epsilon, normalize, rescale, seed, tensor_name, **kw
    ):
        check_della(method, density, epsilon)

        def drop(i, d):
            return della_drop(
                xp, d, density[i], epsilon[i], rescale, seed=seed, name=tensor_name, stream=i
            )

        return _merge(
            xp,
            method,
            tensors,
            base,
            drop,
            weight=weight,
            normalize=normalize,
            lam=kw["lambda"],
            election=kw["election"] if consensus else None,
        )

    return body


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
)(_della("della", consensus=True))

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
)(_della("della_linear", consensus=False))
