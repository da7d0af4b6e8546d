"""Write spec/vectors/<method>.json: small fixed inputs and float64 expected results.

    python -m conformance.make_vectors          # from the project root

Cases and expected results come from methods_reference.py (plain numpy float64 written from
spec/methods.md, each function with its cases), never from mmerge. Inputs are exactly
representable in float32, and task vectors are exact in float32 (grid inputs), so every backend
sees the same numbers. The files are checked on every backend by test_vectors.py, which also
fails when they are stale.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from conformance.methods_reference import METHODS, VECTORS
from conformance.vectors import VECTOR_DIR

FORMAT = 1
ABOUT = (
    "Inputs are flat float64 lists (C order) of `shape`, exact in float32. A result `got` "
    "passes when |got - expected| <= rtol * |expected| + atol * max(1, max|expected|) per "
    "entry, with rtol = atol = tolerance[dtype] of the case."
)


def build() -> dict[str, dict[str, Any]]:
    """Every vector file's content, with expected results filled in."""
    files = {}
    for method, cases in VECTORS.items():
        filled = []
        for c in cases:
            shape = tuple(c["shape"])
            models = [np.asarray(m, np.float64).reshape(shape) for m in c["models"]]
            base = None if c["base"] is None else np.asarray(c["base"], np.float64).reshape(shape)
            out = METHODS[method](models, base, tensor_name=c["tensor_name"], **c["params"])
            filled.append({**c, "expected": np.asarray(out, np.float64).reshape(-1).tolist()})
        files[method] = {"method": method, "format": FORMAT, "about": ABOUT, "cases": filled}
    return files


def main() -> None:
    VECTOR_DIR.mkdir(parents=True, exist_ok=True)
    for method, content in build().items():
        path = VECTOR_DIR / f"{method}.json"
        path.write_text(json.dumps(content, indent=1) + "\n")
        print(f"wrote {path} ({len(content['cases'])} cases)")


if __name__ == "__main__":
    main()
