"""How the suite exercises each registered method: valid inputs, parameters, and which
properties of spec/methods.md apply. A method missing here fails test_coverage.

Adding a method: add a `Case` under its registry name. `counts` lists the (models, base?)
layouts it accepts; `overrides(n)` draws the parameters that the registry's bounds alone do not
make valid (weights that must not cancel, DELLA's density/epsilon pair); the rest are drawn
from the registry's declared bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from conformance.strategies import Inputs, as_f64

TENSOR_NAME = "model.layers.0.mlp.down_proj.weight"


def positive_weights(n: int) -> st.SearchStrategy:
    """One positive weight for all models, or one per model."""
    one = st.sampled_from([1.0, 0.5, 2.0]) | st.floats(0.1, 3.0)
    return one | st.lists(one, min_size=n, max_size=n)


def _no_overrides(n: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.just({})


def _weights(n: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"weight": positive_weights(n)})


@st.composite
def _della(draw, n: int) -> dict[str, Any]:
    """DELLA needs density - epsilon > 0 and density + epsilon <= 1 (when density < 1)."""
    density = draw(st.sampled_from([0.3, 0.5, 1.0]) | st.floats(0.05, 1.0))
    room = min(density, 1.0 - density)
    epsilon = 0.0 if room <= 0 else draw(st.floats(0.0, 0.99 * room))
    return {"density": density, "epsilon": epsilon}


def _karcher(n: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "weight": positive_weights(n),
            "max_iter": st.integers(1, 30),
            "tol": st.sampled_from([1e-5, 1e-7, 1e-3]),
        }
    )


def _always(inputs: Inputs) -> bool:
    return True


def _task_norms_at_least(limit: float) -> Callable[[Inputs], bool]:
    """Task vectors with squared norm >= limit (model_stock clamps |a||b| at 1e-6, as mergekit)."""

    def check(inputs: Inputs) -> bool:
        base = as_f64(inputs.base)
        return all(float(np.sum((as_f64(m) - base) ** 2)) >= limit for m in inputs.models)

    return check


def _directions_do_not_cancel(inputs: Inputs, params: dict[str, Any]) -> bool:
    """The weighted mean of the unit directions is not ~0: antipodal models with balancing
    weights have no unique spherical mean, and karcher then starts from the first model."""
    n = len(inputs.models)
    weight = params.get("weight", 1.0)
    weights = list(weight) if isinstance(weight, list) else [weight] * n
    shift = 0 if inputs.base is None else as_f64(inputs.base)
    mean = 0.0
    for m, w in zip(inputs.models, weights):
        v = as_f64(m) - shift
        norm = float(np.linalg.norm(v))
        if norm <= 1e-5:
            return True
        mean = mean + (w / sum(weights)) * v / norm
    return float(np.linalg.norm(mean)) > 1e-3


def _any(inputs: Inputs, params: dict[str, Any]) -> bool:
    return True


def _models(lo: int, hi: int, base: bool) -> tuple[tuple[int, bool], ...]:
    return tuple((n, base) for n in range(lo, hi + 1))


@dataclass(frozen=True)
class Case:
    """The suite's knowledge of one method."""

    counts: tuple[tuple[int, bool], ...]
    overrides: Callable[[int], st.SearchStrategy[dict[str, Any]]] = _no_overrides
    symmetric: bool = False  # permuting models (with their per-model parameters) keeps it
    self_merge: dict[str, Any] | None = None  # with these parameters, copies of a model give it
    exact: bool = False  # bit-identical on every backend (elementwise float ops, integer masks)
    rtol32: float = 1e-5  # cross-backend / property tolerance in float32, relative to max|input|
    self_merge_when: Callable[[Inputs], bool] = _always  # the spec's condition on the inputs
    # inputs where the result is stable under rounding and model order (symmetry, agreement)
    well_posed: Callable[[Inputs, dict[str, Any]], bool] = _any
    base_is_a_model: bool = False  # with a base, the base is the first endpoint (slerp-like)
    refusals: tuple[str, ...] = ()  # InvalidInput messages the spec allows for valid-looking input


_TASK = _models(1, 3, True)
_MERGE_SELF = {"density": 1.0, "normalize": True, "lambda": 1.0, "weight": 1.0}

CASES: dict[str, Case] = {
    "linear": Case(
        _models(1, 3, False), _weights, symmetric=True, self_merge={"normalize": True}, exact=True
    ),
    "slerp": Case(((2, False), (1, True)), self_merge={}, rtol32=2e-4, base_is_a_model=True),
    "nuslerp": Case(((2, False), (2, True)), _weights, symmetric=True, self_merge={}, rtol32=2e-4),
    "multislerp": Case(
        _models(1, 3, False) + _models(2, 3, True),
        _weights,
        symmetric=True,
        self_merge={"normalize_weights": True},
        rtol32=2e-4,
        refusals=("directions cancel out",),
    ),
    "karcher": Case(
        _models(1, 3, False) + _models(2, 3, True),
        _karcher,
        symmetric=True,
        well_posed=_directions_do_not_cancel,
        self_merge={},
        rtol32=2e-4,
    ),
    "task_arithmetic": Case(
        _TASK,
        symmetric=True,
        self_merge={"normalize": True, "lambda": 1.0, "weight": 1.0},
        exact=True,
    ),
    "ties": Case(_TASK, symmetric=True, self_merge=_MERGE_SELF, exact=True),
    "dare_linear": Case(_TASK, self_merge=_MERGE_SELF, exact=True),
    "dare_ties": Case(_TASK, self_merge=_MERGE_SELF, exact=True),
    "breadcrumbs": Case(_TASK, symmetric=True, self_merge=_MERGE_SELF, exact=True),
    "breadcrumbs_ties": Case(_TASK, symmetric=True, self_merge=_MERGE_SELF, exact=True),
    "della": Case(_TASK, _della, self_merge=_MERGE_SELF, exact=True),
    "della_linear": Case(_TASK, _della, self_merge=_MERGE_SELF, exact=True),
    "model_stock": Case(
        _models(2, 3, True),
        symmetric=True,
        self_merge={},
        self_merge_when=_task_norms_at_least(1e-6),
    ),
    "sce": Case(_TASK, symmetric=True, self_merge={"select_topk": 1.0}, exact=True),
    "nearswap": Case(((2, False), (1, True)), self_merge={}, exact=True, base_is_a_model=True),
    "passthrough": Case(((1, False),), self_merge={"scale": 1.0}, exact=True),
}
