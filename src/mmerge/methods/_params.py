"""Parameter declarations shared by several methods (names follow mergekit's recipe keys)."""

from __future__ import annotations

from mmerge.methods.registry import Param

WEIGHT = Param("weight", float, 1.0, "weight of each model", per_model=True)
LAMBDA = Param("lambda", float, 1.0, "scale applied to the merged task vector")
SEED = Param(
    "seed", int, 0, "seed of the random drop mask (with the tensor name)", low=0, high=2**63 - 1
)
GAMMA = Param(
    "gamma",
    float,
    0.01,
    "fraction of largest-magnitude entries dropped as outliers",
    low=0.0,
    high=1.0,
    high_open=True,
    per_model=True,
)
EPSILON = Param(
    "epsilon",
    float,
    0.15,
    "spread of keep probabilities around density (density-eps .. density+eps)",
    low=0.0,
    high=1.0,
    high_open=True,
    per_model=True,
)
ELECTION = Param(
    "election",
    str,
    "weighted_sum",
    "sign election: weighted_sum (mergekit), sum (TIES paper), count (majority)",
    choices=("weighted_sum", "sum", "count"),
)


def density(default: float = 1.0) -> Param:
    """The per-model fraction of task-vector entries kept, in (0, 1]."""
    return Param(
        "density",
        float,
        default,
        "fraction of task-vector entries kept",
        low=0.0,
        high=1.0,
        low_open=True,
        per_model=True,
    )


def normalize(default: bool, what: str = "divide by the sum of the (agreeing) weights") -> Param:
    """The `normalize` switch with a method-specific default (mergekit's)."""
    return Param("normalize", bool, default, what)


def rescale(default: str) -> Param:
    """How survivors of a drop are rescaled: l1 (mergekit), inverse_density (paper), none.
    mergekit's boolean spelling is accepted: true is l1, false is none."""
    return Param(
        "rescale",
        str,
        default,
        "rescale survivors: l1 (match sum|delta|; mergekit's true), inverse_density (divide "
        "by keep probability), none (mergekit's false)",
        choices=("l1", "inverse_density", "none"),
        synonyms=((True, "l1"), (False, "none")),
    )
