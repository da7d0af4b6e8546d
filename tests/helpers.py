"""What the unit tests share with the conformance suite: its backend table (skipping those not
usable here), its one float64 reference of spec/methods.md, and its one tolerance check."""

from __future__ import annotations

import numpy as np
import pytest

from conformance import methods_reference as REF  # noqa: F401  (re-exported for the tests)
from conformance.backends import BY_ID
from conformance.tolerance import assert_close  # noqa: F401
from mmerge import backend

LOCAL = ("numpy", "torch", "array_api_strict", "mlx")


def backend_params() -> list:
    """pytest params for the CPU backends, skipped with the reason where unavailable."""
    out = []
    for name in LOCAL:
        ok, reason = BY_ID[name].available()
        marks = () if ok else pytest.mark.skip(reason=reason)
        out.append(pytest.param(name, id=name, marks=marks))
    return out


BACKENDS = backend_params()


def to_backend(name: str, a) -> object:
    """`a` (a numpy array) as an array of backend `name`, dtype kept where the library has it."""
    return BY_ID[name].put(np.asarray(a))


def to_numpy(x) -> np.ndarray:
    """Any backend's array as a numpy array (bfloat16 widened to float32)."""
    host = backend.to_host(x)
    return host.astype(np.float32) if host.dtype.name == "bfloat16" else host


def grid(rng: np.random.Generator, shape, scale: float = 1.0, step: float = 2.0**-10):
    """Random float32 values on a grid of `step`: sums and differences of them are exact in
    float32, so a float64 reference sees exactly the task vectors the library sees."""
    return (np.round(rng.standard_normal(shape) * scale / step) * step).astype(np.float32)
