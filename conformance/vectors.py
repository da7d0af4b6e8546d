"""Reading the spec test vectors: spec/vectors/<method>.json, written by make_vectors.py.

File format (any implementation can read it): {"method", "format": 1, "about", "cases": [{"id",
"shape", "models": [[flat float64 values, C order], ...], "base": [...] | null, "params",
"tensor_name", "tolerance": {"float32": tol, "float64": tol}, "expected": [...]}]}. Inputs are
exact in float32; `expected` is the float64 reference result. A result passes when
|got - expected| <= tol * |expected| + tol * max(1, max|expected|) for every entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

VECTOR_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors"
TENSOR_NAME = "model.layers.0.self_attn.q_proj.weight"
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
SPHERICAL = {"float32": 1e-4, "float64": 1e-10}  # the tolerance of the spherical methods


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


def case(case_id: str, models, base, params: dict, tolerance=None) -> dict[str, Any]:
    """One vector case (without its expected result, which make_vectors computes)."""
    return {
        "id": case_id,
        "shape": list(np.shape(models[0])),
        "models": [np.asarray(m).reshape(-1).tolist() for m in models],
        "base": None if base is None else np.asarray(base).reshape(-1).tolist(),
        "params": params,
        "tensor_name": TENSOR_NAME,
        "tolerance": tolerance or TOLERANCE,
    }


def load(method: str) -> dict[str, Any]:
    """The parsed vector file of `method`."""
    return json.loads((VECTOR_DIR / f"{method}.json").read_text())


def available() -> list[str]:
    """The methods that have a vector file."""
    return sorted(p.stem for p in VECTOR_DIR.glob("*.json"))
