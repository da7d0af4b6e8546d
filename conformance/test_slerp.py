"""SLERP geometry (spec/methods.md): for unit inputs the result is a unit vector, and its
angle to each endpoint is linear in t: angle(a, r) = t * theta, angle(r, b) = (1 - t) * theta."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.profiles import PROFILE
from conformance.run import Call, merge_on_host
from conformance.strategies import Inputs, as_f64, cast

TOL = {"float32": 1e-5, "float64": 1e-12}  # norm; angles get TOL / sin(theta)-scaled slack


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    """The angle between u and v, accurate also near 0 and pi (acos of the cosine is not)."""
    a, b = u / np.linalg.norm(u), v / np.linalg.norm(v)
    return 2.0 * math.atan2(float(np.linalg.norm(a - b)), float(np.linalg.norm(a + b)))


@st.composite
def unit_pair(draw, dtypes):
    """Two unit vectors (float32/float64) at an angle well inside (0, pi)."""
    dtype = draw(st.sampled_from([d for d in dtypes if d in TOL]))
    n = draw(st.sampled_from([2, 3, 17, 256, 4096]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    theta = draw(st.floats(0.1, math.pi - 0.1), label="theta")
    a = rng.standard_normal(n)
    a /= np.linalg.norm(a)
    other = rng.standard_normal(n)
    other -= (other @ a) * a
    other /= np.linalg.norm(other)
    b = math.cos(theta) * a + math.sin(theta) * other
    return cast(a, dtype), cast(b, dtype), dtype


@pytest.mark.parametrize("magnitude", ["shoemake", "norm_interp"])
@PROFILE
@given(data=st.data())
def test_slerp_of_unit_vectors_keeps_the_norm_and_is_linear_in_angle(backend, magnitude, data):
    a, b, dtype = data.draw(unit_pair(backend.float_dtypes()))
    t = data.draw(st.floats(0.0, 1.0), label="t")
    call = Call("slerp", Inputs([a, b], None, dtype), {"t": t, "magnitude": magnitude})
    r = as_f64(merge_on_host(backend, call))
    a64, b64 = as_f64(a), as_f64(b)
    theta = _angle(a64, b64)
    tol = TOL[dtype] * 10
    assert abs(float(np.linalg.norm(r)) - 1.0) <= tol, "norm of slerp of unit vectors"
    assert abs(_angle(a64, r) - t * theta) <= tol / math.sin(theta) + tol
    assert abs(_angle(r, b64) - (1.0 - t) * theta) <= tol / math.sin(theta) + tol
