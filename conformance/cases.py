"""How the suite exercises each registered method, derived from the registry: the (models,
base?) layouts it accepts, its parameters (drawn from their declared bounds), and the properties
it declares (symmetric, exact, self-merge parameters, tolerance).

A new method needs nothing here. `CONDITIONING` refines the draws of methods whose parameters
are only valid together (DELLA's density and epsilon) or that are ill-conditioned on some inputs
(weights that cancel, antipodal directions), with the spec's reason for each.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from conformance.strategies import Inputs, as_f64
from mmerge.methods import MethodSpec, all_methods

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


def _directions_do_not_cancel(inputs: Inputs, params: dict[str, Any]) -> bool:
    """The weighted mean of the unit directions (of vectors longer than tol, as karcher uses)
    is not near 0: antipodal models with balancing weights have no unique spherical mean;
    karcher then starts from the first model, and multislerp switches to a linear mix at
    |mean| < 1e-8, so order and rounding decide the result."""
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


def _votes_do_not_cancel(inputs: Inputs, params: dict[str, Any]) -> bool:
    """ties, breadcrumbs_ties, sce with three or more models: no entry where the votes of two or
    more of them (any may survive the trimming; plain or weighted) sum to within rounding of 0.
    There the elected sign follows the order of the sum, which the models' order changes (two
    votes add the same in either order)."""
    k = len(inputs.models)
    if k < 3 or inputs.base is None:
        return True
    deltas = [as_f64(m) - as_f64(inputs.base) for m in inputs.models]
    weight = params.get("weight", 1.0)
    weights = weight if isinstance(weight, list) else [weight] * k
    rounding = 8 * (2.0**-53 if inputs.dtype == "float64" else 2.0**-24)
    for votes in (deltas, [w * d for w, d in zip(weights, deltas)]):
        for size in range(2, k + 1):
            for subset in itertools.combinations(votes, size):
                total, bulk = sum(subset), sum(np.abs(v) for v in subset)
                if bool(np.any((bulk > 0) & (np.abs(total) <= rounding * bulk))):
                    return False
    return True


@dataclass(frozen=True)
class Conditioning:
    """What the registry's bounds alone cannot say about drawing a method's calls."""

    overrides: Callable[[int], st.SearchStrategy[dict[str, Any]]] = _no_overrides
    # inputs where the result is stable under rounding and model order (symmetry, agreement)
    well_posed: Callable[[Inputs, dict[str, Any]], bool] = _any
    # InvalidInput messages the spec allows for valid-looking input
    refusals: tuple[str, ...] = ()
    # parameters only valid together (drawn jointly by `overrides`)
    coupled: tuple[str, ...] = ()


CONDITIONING: dict[str, Conditioning] = {
    # normalized weights that cancel have no defined result (spec: "sum not 0")
    "linear": Conditioning(_weights),
    "nuslerp": Conditioning(_weights, well_posed=_away_from_lerp_switch),
    "multislerp": Conditioning(
        _weights, well_posed=_directions_do_not_cancel, refusals=("directions cancel out",)
    ),
    "karcher": Conditioning(_karcher, well_posed=_directions_do_not_cancel),
    # density - epsilon > 0 and density + epsilon <= 1 (spec section 4)
    "della": Conditioning(_della, coupled=("density", "epsilon")),
    "della_linear": Conditioning(_della, coupled=("density", "epsilon")),
    "model_stock": Conditioning(well_posed=_ratio_is_finite),
    # sign elections: a vote summing to about 0 elects by the order of the sum
    "ties": Conditioning(well_posed=_votes_do_not_cancel),
    "breadcrumbs_ties": Conditioning(well_posed=_votes_do_not_cancel),
    "sce": Conditioning(well_posed=_votes_do_not_cancel),
}


def layouts(spec: MethodSpec, most: int = 3) -> tuple[tuple[int, bool], ...]:
    """The (models, base?) layouts a method accepts, up to `most` models: what the registry
    declares about its base and model counts."""
    top = min(spec.max_models or most, most)
    plain = tuple((n, False) for n in range(spec.min_models, top + 1))
    with_base = tuple((n, True) for n in range(max(spec.min_models, 1), top + 1))
    if spec.base == "endpoint":  # the base counts as the first endpoint
        return ((top, False), (top - 1, True))
    return {"none": plain, "required": with_base, "optional": plain + with_base}[spec.base]


@dataclass(frozen=True)
class Case:
    """The suite's knowledge of one method: the registry's declarations and its conditioning."""

    spec: MethodSpec
    conditioning: Conditioning

    @property
    def counts(self) -> tuple[tuple[int, bool], ...]:
        return layouts(self.spec)

    @property
    def symmetric(self) -> bool:
        return self.spec.symmetric

    @property
    def exact(self) -> bool:
        return self.spec.exact

    @property
    def self_merge(self) -> dict[str, Any] | None:
        return self.spec.self_merge

    @property
    def rtol32(self) -> float:
        return self.spec.tolerance

    @property
    def base_is_a_model(self) -> bool:
        return self.spec.base == "endpoint"

    def overrides(self, n: int) -> st.SearchStrategy[dict[str, Any]]:
        return self.conditioning.overrides(n)

    @property
    def well_posed(self) -> Callable[[Inputs, dict[str, Any]], bool]:
        return self.conditioning.well_posed

    @property
    def refusals(self) -> tuple[str, ...]:
        return self.conditioning.refusals

    @property
    def coupled(self) -> tuple[str, ...]:
        return self.conditioning.coupled


CASES: dict[str, Case] = {
    spec.name: Case(spec, CONDITIONING.get(spec.name, Conditioning())) for spec in all_methods()
}
