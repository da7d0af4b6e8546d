"""The spec test vectors (spec/vectors/*.json) on every backend, in float32 and float64."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conformance import make_vectors
from conformance.run import Call, merge_on_host
from conformance.strategies import Inputs, cast
from conformance.tolerance import assert_close
from conformance.vectors import VECTOR_DIR, available, load

CASES = [(m, c["id"]) for m in available() for c in load(m)["cases"]]


def test_vector_files_are_what_make_vectors_writes():
    for method, content in make_vectors.build().items():
        stored = json.loads((VECTOR_DIR / f"{method}.json").read_text())
        assert stored == json.loads(json.dumps(content)), (
            f"spec/vectors/{method}.json is stale: run `python -m conformance.make_vectors`"
        )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("method", "case_id"), CASES)
def test_vector(backend, method, case_id, dtype):
    if dtype not in backend.float_dtypes():
        dtype = "float32"  # a float32-only backend runs the float32 check twice
    c = next(c for c in load(method)["cases"] if c["id"] == case_id)
    shape = tuple(c["shape"])
    models = [cast(np.reshape(m, shape), dtype) for m in c["models"]]
    base = None if c["base"] is None else cast(np.reshape(c["base"], shape), dtype)
    call = Call(method, Inputs(models, base, dtype), c["params"], c["tensor_name"])
    got = merge_on_host(backend, call)
    want = np.reshape(np.asarray(c["expected"], np.float64), shape)
    tol = c["tolerance"][dtype]
    assert_close(got, want, rtol=tol, atol=tol, what=f"{method}/{case_id} in {dtype}")
