"""Write spec/vectors/<method>.json: small fixed inputs and float64 expected results.

    python -m conformance.make_vectors          # from the project root

Expected results come from methods_reference.py (plain numpy float64 written from
spec/methods.md), never from mmerge. Inputs are exactly representable in float32, and task
vectors are exact in float32 (grid inputs), so every backend sees the same numbers. The files
are checked on every backend by test_vectors.py, which also fails when they are stale.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from conformance.methods_reference import METHODS
from conformance.vectors import VECTOR_DIR

FORMAT = 1
TENSOR_NAME = "model.layers.0.self_attn.q_proj.weight"
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
SPHERICAL_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
ABOUT = (
    "Inputs are flat float64 lists (C order) of `shape`, exact in float32. A result `got` "
    "passes when |got - expected| <= rtol * |expected| + atol * max(1, max|expected|) per "
    "entry, with rtol = atol = tolerance[dtype] of the case."
)


def grid(rng: np.random.Generator, shape: tuple[int, ...], step: float) -> np.ndarray:
    """Multiples of `step` in [-16 step, 16 step]: exact in float32, sums exact, many ties."""
    return rng.integers(-16, 17, size=shape) * step


def smooth(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values rounded to float32."""
    return rng.standard_normal(shape).astype(np.float32).astype(np.float64)


def family(seed: int, shape, n: int, *, with_base: bool, kind: str = "grid"):
    """`n` models (fine-tunes of a base on the grid when `with_base`), and the base."""
    rng = np.random.default_rng(seed)
    if kind == "smooth":
        models = [smooth(rng, shape) for _ in range(n)]
        return models, (smooth(rng, shape) if with_base else None)
    base = grid(rng, shape, 1 / 8) if with_base else np.zeros(shape)
    models = [base + grid(rng, shape, 1 / 64) for _ in range(n)]
    return models, (base if with_base else None)


def case(case_id, models, base, params, tolerance=None) -> dict[str, Any]:
    return {
        "id": case_id,
        "shape": list(np.shape(models[0])),
        "models": [m.reshape(-1).tolist() for m in models],
        "base": None if base is None else base.reshape(-1).tolist(),
        "params": params,
        "tensor_name": TENSOR_NAME,
        "tolerance": tolerance or TOLERANCE,
    }


def _interpolation_cases() -> dict[str, list[dict[str, Any]]]:
    sm = SPHERICAL_TOLERANCE
    a, b = family(1, (2, 8), 2, with_base=False, kind="smooth")[0]
    m3, base3 = family(2, (3, 4), 3, with_base=True, kind="smooth")
    g3, _ = family(3, (3, 4), 3, with_base=False)
    g2, gb = family(4, (2, 5), 1, with_base=True)
    return {
        "linear": [
            case("equal_weights", g3, None, {}),
            case("weights", g3[:2], None, {"weight": [0.25, 0.75]}),
            case("unnormalized", g3[:2], None, {"weight": [1.0, -0.5], "normalize": False}),
            case("single", g3[:1], None, {"weight": 2.0}),
        ],
        "slerp": [
            case("midpoint", [a, b], None, {"t": 0.5}, sm),
            case("base_first", [b], a, {"t": 0.3}, sm),
            case("norm_interp", [a, 3 * b], None, {"t": 0.7, "magnitude": "norm_interp"}, sm),
            case("parallel_lerps", [a, 2 * a], None, {"t": 0.25}, sm),
            case("antipodal_lerps", [a, -a], None, {"t": 0.5}, sm),
            case("zero_lerps", [np.zeros_like(a), b], None, {"t": 0.6}, sm),
        ],
        "nuslerp": [
            case("flat", [a, b], None, {"weight": [1.0, 3.0]}, sm),
            case("rows", m3[:2], None, {"nuslerp_flatten": False}, sm),
            case(
                "row_wise", m3[:2], None, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, sm
            ),
            case("task_vectors", m3[:2], base3, {"weight": [2.0, 1.0]}, sm),
        ],
        "multislerp": [
            case("three", m3, None, {}, sm),
            case("weighted_task_vectors", m3, base3, {"weight": [0.5, 0.3, 0.2]}, sm),
            case("single", m3[:1], None, {}, sm),
        ],
        "karcher": [
            case("three", m3, None, {}, sm),
            case(
                "weighted_task_vectors", m3, base3, {"weight": [0.5, 0.3, 0.2], "max_iter": 3}, sm
            ),
            case("two", [a, b], None, {"max_iter": 50, "tol": 1e-7}, sm),
        ],
        "nearswap": [
            case("pair", [g3[0], np.where(g3[1] > 0, g3[0], g3[1])], None, {"t": 0.1}),
            case("base_first", g2, gb, {"t": 0.05}),
        ],
        "passthrough": [
            case("copy", g3[:1], None, {}),
            case("scaled", g3[:1], None, {"scale": -0.5}),
        ],
        "model_stock": [
            case("two", m3[:2], base3, {}, sm),
            case("three", m3, base3, {}, sm),
            case("filter_wise", m3, base3, {"filter_wise": True}, sm),
        ],
    }


def _task_cases() -> dict[str, list[dict[str, Any]]]:
    two, base = family(5, (4, 6), 2, with_base=True)
    three, base3 = family(6, (3, 8), 3, with_base=True)
    flat, base_flat = family(7, (40,), 2, with_base=True)
    return {
        "task_arithmetic": [
            case("weights_lambda", two, base, {"weight": [0.7, -0.3], "lambda": 0.5}),
            case("normalized", three, base3, {"weight": [1.0, 2.0, 1.0], "normalize": True}),
        ],
        "ties": [
            case("density_half", three, base3, {"density": 0.5}),
            case("election_sum", three, base3, {"density": 0.4, "election": "sum"}),
            case("election_count", three, base3, {"density": 0.4, "election": "count"}),
            case("per_model", two, base, {"density": [0.3, 0.6], "weight": [1.0, 0.5]}),
            case(
                "unnormalized_l1", two, base, {"density": 0.5, "normalize": False, "rescale": "l1"}
            ),
        ],
        "dare_linear": [
            case("density_half", two, base, {"density": 0.5}),
            case(
                "inverse_density",
                three,
                base3,
                {"density": 0.3, "rescale": "inverse_density", "seed": 123},
            ),
            case(
                "no_rescale", flat, base_flat, {"density": [0.2, 0.7], "rescale": "none", "seed": 9}
            ),
        ],
        "dare_ties": [
            case("density_half", three, base3, {"density": 0.5, "seed": 4}),
            case("election_sum", three, base3, {"density": 0.6, "election": "sum", "seed": 5}),
        ],
        "breadcrumbs": [
            case("band", flat, base_flat, {"density": 0.5, "gamma": 0.1}),
            case("no_outliers", two, base, {"density": 0.4, "gamma": 0.0}),
            case(
                "inverse_density",
                three,
                base3,
                {"density": 0.5, "gamma": 0.05, "rescale": "inverse_density"},
            ),
        ],
        "breadcrumbs_ties": [
            case("band", three, base3, {"density": 0.5, "gamma": 0.1}),
            case("normalized", two, base, {"density": 0.6, "gamma": 0.05, "normalize": True}),
        ],
        "della": [
            case("rows", three, base3, {"density": 0.5, "epsilon": 0.2, "seed": 1}),
            case(
                "flat_inverse",
                flat,
                base_flat,
                {"density": 0.6, "epsilon": 0.3, "rescale": "inverse_density"},
            ),
        ],
        "della_linear": [
            case("rows", two, base, {"density": 0.4, "epsilon": 0.1, "seed": 2}),
            case("flat_none", flat, base_flat, {"density": 0.5, "epsilon": 0.4, "rescale": "none"}),
        ],
        "sce": [
            case("all", three, base3, {}),
            case("select_half", three, base3, {"select_topk": 0.5}),
        ],
    }


def build() -> dict[str, dict[str, Any]]:
    """Every vector file's content, with expected results filled in."""
    files = {}
    for method, cases in {**_interpolation_cases(), **_task_cases()}.items():
        for c in cases:
            shape = tuple(c["shape"])
            models = [np.asarray(m, np.float64).reshape(shape) for m in c["models"]]
            base = None if c["base"] is None else np.asarray(c["base"], np.float64).reshape(shape)
            out = METHODS[method](models, base, tensor_name=c["tensor_name"], **c["params"])
            c["expected"] = np.asarray(out, np.float64).reshape(-1).tolist()
        files[method] = {"method": method, "format": FORMAT, "about": ABOUT, "cases": cases}
    return files


def main() -> None:
    VECTOR_DIR.mkdir(parents=True, exist_ok=True)
    for method, content in build().items():
        path = VECTOR_DIR / f"{method}.json"
        path.write_text(json.dumps(content, indent=1) + "\n")
        print(f"wrote {path} ({len(content['cases'])} cases)")


if __name__ == "__main__":
    main()
