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


def _task_norms_at_least(limit: float) -> Callable[[Inputs, dict[str, Any]], bool]:
    """Every task vector (every row along the last axis with `filter_wise`) has a squared norm
    of at least `limit`: model_stock clamps |a||b| at 1e-6, as mergekit."""

    def check(inputs: Inputs, params: dict[str, Any]) -> bool:
        base = as_f64(inputs.base)
        for m in inputs.models:
            d = as_f64(m) - base
            rows = d if params.get("filter_wise") and d.ndim >= 2 else d.reshape(1, -1)
            if np.sum(rows**2, axis=-1).min(initial=np.inf) < limit:
                return False
        return True

    return check


def _directions_do_not_cancel(inputs: Inputs, params: dict[str, Any]) -> bool:
    """The weighted mean of the unit directions (of vectors longer than tol, as karcher uses)
    is not near 0: antipodal models with balancing weights have no unique spherical mean, and
    karcher then starts from the first model, so order and rounding decide the result."""
    n = len(inputs.models)
    weight = params.get("weight", 1.0)
    weights = list(weight) if isinstance(weight, list) else [weight] * n
    shift = 0 if inputs.base is None else as_f64(inputs.base)
    vectors = [(w, as_f64(m) - shift) for w, m in zip(weights, inputs.models)]
    valid = [
        (w, v / np.linalg.norm(v))
        for w, v in vectors
        if np.linalg.norm(v) > params.get("tol", 1e-5)
    ]
    if len(valid) < 2:
        return True
    total = sum(w for w, _ in valid)
    mean = sum(w / total * u for w, u in valid)
    return float(np.linalg.norm(mean)) > 0.05


def _any(inputs: Inputs, params: dict[str, Any]) -> bool:
    return True


def _longer_than_tol(inputs: Inputs, params: dict[str, Any]) -> bool:
    """karcher treats vectors of norm <= tol as having no direction (they merge to zeros)."""
    shift = 0 if inputs.base is None else as_f64(inputs.base)
    return all(np.linalg.norm(as_f64(m) - shift) > params["tol"] for m in inputs.models)


def _selection_is_clear(inputs: Inputs, params: dict[str, Any]) -> bool:
    """sce: no tie in variance at the select_topk cut. Exactly tied variances come out of
    float32 rounding in an order-dependent way, so the selected set could flip."""
    if params.get("select_topk", 1.0) >= 1:
        return True
    base = as_f64(inputs.base)
    deltas = np.stack([as_f64(m) - base for m in inputs.models]).reshape(len(inputs.models), -1)
    variance = np.sort(deltas.var(axis=0))[::-1]
    k = int(params["select_topk"] * np.count_nonzero(variance))
    if k <= 0 or k >= variance.size:
        return True
    return bool(variance[k - 1] - variance[k] > 1e-4 * variance[0])


def _ratio_is_finite(inputs: Inputs, params: dict[str, Any]) -> bool:
    """model_stock: 1 + (k-1) cos is not near 0, where t = k cos / (1 + (k-1) cos) explodes."""
    base, k = as_f64(inputs.base), len(inputs.models)
    offsets = [as_f64(m) - base for m in inputs.models]
    if params.get("filter_wise") and base.ndim >= 2:
        offsets = [o.reshape(-1, o.shape[-1]) for o in offsets]
    else:
        offsets = [o.reshape(1, -1) for o in offsets]
    pairs = [
        np.clip(
            np.sum(offsets[i] * offsets[j], -1)
            / np.maximum(
                np.linalg.norm(offsets[i], axis=-1) * np.linalg.norm(offsets[j], axis=-1), 1e-6
            ),
            -1,
            1,
        )
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = sum(pairs) / len(pairs)
    return bool(np.all(np.abs(1 + (k - 1) * cos) > 0.05))


def _away_from_lerp_switch(inputs: Inputs, params: dict[str, Any]) -> bool:
    """nuslerp: no vector pair near the switch from slerp to lerp (|sin theta| = 1e-3, a norm
    of 1e-8), where backends may fall on different sides, or nearly antipodal on the arc,
    where 1/sin theta magnifies rounding."""
    v0, v1 = (as_f64(m) for m in inputs.models)
    if inputs.base is not None:
        v0, v1 = v0 - as_f64(inputs.base), v1 - as_f64(inputs.base)
    if params.get("nuslerp_flatten", True) or v0.ndim <= 1:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif params.get("nuslerp_row_wise"):
        v0, v1 = (np.moveaxis(v, 0, -1).reshape(-1, v.shape[0]) for v in (v0, v1))
    else:
        v0, v1 = (v.reshape(-1, v.shape[-1]) for v in (v0, v1))
    n0, n1 = np.linalg.norm(v0, axis=-1), np.linalg.norm(v1, axis=-1)
    cos = np.sum(v0 * v1, -1) / np.maximum(n0 * n1, 1e-300)
    sin = np.sqrt(np.clip(1 - cos**2, 0, 1))
    arc = sin > 1e-3 / np.e  # surely on the arc, not the lerp fallback
    near_switch = arc & (sin < 1e-3 * np.e)
    near_antipodal = arc & (cos < 0) & (sin < 0.05)  # the arc divides by a tiny sin theta
    return not bool((near_switch | near_antipodal | (np.minimum(n0, n1) < 1e-6)).any())


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
    # the spec's condition on inputs and parameters for the self-merge identity
    self_merge_when: Callable[[Inputs, dict[str, Any]], bool] = _any
    # inputs where the result is stable under rounding and model order (symmetry, agreement)
    well_posed: Callable[[Inputs, dict[str, Any]], bool] = _any
    base_is_a_model: bool = False  # with a base, the base is the first endpoint (slerp-like)
    # InvalidInput messages the spec allows for valid-looking input
    refusals: tuple[str, ...] = ()
    # parameters only valid together (drawn jointly by `overrides`)
    coupled: tuple[str, ...] = ()


_TASK = _models(1, 3, True)
_DELLA_PAIR = ("density", "epsilon")
_MERGE_SELF = {"density": 1.0, "normalize": True, "lambda": 1.0, "weight": 1.0}

CASES: dict[str, Case] = {
    "linear": Case(
        _models(1, 3, False), _weights, symmetric=True, self_merge={"normalize": True}, exact=True
    ),
    "slerp": Case(((2, False), (1, True)), self_merge={}, rtol32=2e-4, base_is_a_model=True),
    "nuslerp": Case(
        ((2, False), (2, True)),
        _weights,
        symmetric=True,
        self_merge={},
        rtol32=2e-4,
        well_posed=_away_from_lerp_switch,
    ),
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
        self_merge_when=_longer_than_tol,
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
    "della": Case(_TASK, _della, self_merge=_MERGE_SELF, exact=True, coupled=_DELLA_PAIR),
    "della_linear": Case(_TASK, _della, self_merge=_MERGE_SELF, exact=True, coupled=_DELLA_PAIR),
    "model_stock": Case(
        _models(2, 3, True),
        symmetric=True,
        self_merge={},
        self_merge_when=_task_norms_at_least(1e-6),
        well_posed=_ratio_is_finite,
    ),
    "sce": Case(
        _TASK,
        symmetric=True,
        self_merge={"select_topk": 1.0},
        exact=True,
        well_posed=_selection_is_clear,
    ),
    "nearswap": Case(((2, False), (1, True)), self_merge={}, exact=True, base_is_a_model=True),
    "passthrough": Case(((1, False),), self_merge={"scale": 1.0}, exact=True),
}
