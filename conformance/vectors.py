"""Reading the spec test vectors: spec/vectors/<method>.json, written by make_vectors.py.

File format (any implementation can read it): {"method", "format": 1, "cases": [{"id",
"params", "tensor_name", "shape", "models": [[...flat float64...]], "base": [...] | null,
"expected": [...flat float64...], "rtol": {"float32": r, "float64": r}}]}. Inputs are exactly
representable in float32; `expected` is the float64 reference result; a result passes when
|got - expected| <= rtol[dtype] * max|input| + 2 * unit roundoff * |expected| (tolerance.py).
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
