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

VECTOR_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors"


def load(method: str) -> dict[str, Any]:
    """The parsed vector file of `method`."""
    return json.loads((VECTOR_DIR / f"{method}.json").read_text())


def available() -> list[str]:
    """The methods that have a vector file."""
    return sorted(p.stem for p in VECTOR_DIR.glob("*.json"))
