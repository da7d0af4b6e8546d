"""Hypothesis strategies for merge inputs, drawn as host (numpy) arrays.

A drawn `Inputs` holds the models (and base) of one merge in one float dtype: shapes from 0-d
and single elements to a few thousand entries; values with zeros, tiny and large magnitudes and
exact magnitude ties; models that are independent, identical, opposite, parallel or close.
Values come from a numpy generator seeded by Hypothesis, so large arrays stay cheap and every
example shrinks to a small one. Parameters are drawn from the registry's declared bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from mmerge.methods import MethodSpec, Param

HOST_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}

SHAPES = [(), (1,), (5,), (2, 3), (64,), (16, 33), (3, 4, 5), (48, 64), (4096,)]
PATTERNS = ("normal", "ties", "mixed", "zeros", "sparse")
RELATIONS = ("independent", "identical", "opposite", "parallel", "close")

# magnitudes per dtype: "tiny" includes subnormals; "large" leaves room to add a few models
TINY = {"float16": 6e-8, "bfloat16": 1e-38, "float32": 1e-40, "float64": 1e-310}
LARGE = {"float16": 2e3, "bfloat16": 1e6, "float32": 1e6, "float64": 1e6}


@dataclass
class Inputs:
    """The host arrays of one merge: `models` (one per model) and `base` (or None)."""

    models: list[np.ndarray]
    base: np.ndarray | None
    dtype: str
    relation: str = "independent"

    @property
    def everything(self) -> list[np.ndarray]:
        return self.models + ([self.base] if self.base is not None else [])

    @property
    def scale(self) -> float:
        """The largest magnitude among the inputs (1 when all are zero): the tolerance scale."""
        top = max((float(np.max(np.abs(as_f64(a)))) for a in self.everything if a.size), default=0)
        return top or 1.0


def as_f64(host: np.ndarray) -> np.ndarray:
    """Any host float array as float64 (bfloat16 included), exactly."""
    return np.asarray(host).astype(np.float64)


def cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to `dtype` (nearest even); an array even for 0-d shapes."""
    return np.asarray(np.asarray(values, np.float64).astype(HOST_DTYPES[dtype]))


def values(rng: np.random.Generator, shape: tuple[int, ...], pattern: str, dtype: str):
    """float64 values of `shape` following `pattern` (see PATTERNS)."""
    n = math.prod(shape)
    if pattern == "zeros":
        flat = np.zeros(n)
    elif pattern == "ties":  # few distinct magnitudes: exact ties in |x|
        flat = rng.choice([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], size=n)
    elif pattern == "sparse":
        flat = rng.standard_normal(n) * (rng.random(n) < 0.1)
    else:
        flat = rng.standard_normal(n) * float(rng.choice([1e-3, 1.0, 30.0]))
    if pattern == "mixed" and n:
        kinds = rng.integers(0, 6, size=n)
        flat = np.where(kinds == 0, 0.0, flat)
        flat = np.where(kinds == 1, np.sign(flat) * TINY[dtype] * rng.integers(1, 4, n), flat)
        flat = np.where(kinds == 2, np.sign(flat) * LARGE[dtype] * rng.random(n), flat)
    return flat.reshape(shape)


def related(rng: np.random.Generator, first: np.ndarray, relation: str, pattern: str, dtype: str):
    """Another model's values, standing in `relation` to `first`."""
    if relation == "identical":
        return first
    if relation == "opposite":
        return -first
    if relation == "parallel":
        return first * float(rng.choice([0.5, 2.0, 3.0]))
    if relation == "close":
        return first + 1e-3 * np.abs(first).max(initial=1.0) * rng.standard_normal(first.shape)
    return values(rng, first.shape, pattern, dtype)


@st.composite
def inputs(
    draw,
    dtypes: tuple[str, ...],
    n_models: int,
    with_base: bool,
    *,
    shapes=None,
    relations: tuple[str, ...] = RELATIONS,
) -> Inputs:
    """`n_models` related models (fine-tunes of a drawn base when `with_base`) in one dtype."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.sampled_from(shapes or SHAPES))
    pattern = draw(st.sampled_from(PATTERNS))
    relation = draw(st.sampled_from(relations))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    first = values(rng, shape, pattern, dtype)
    vecs = [first] + [related(rng, first, relation, pattern, dtype) for _ in range(n_models - 1)]
    base = None
    if with_base:
        base = values(rng, shape, draw(st.sampled_from(("normal", "zeros", "ties"))), dtype)
        vecs = [base + v for v in vecs]  # the drawn vectors are the task vectors
        base = cast(base, dtype)
    return Inputs([cast(v, dtype) for v in vecs], base, dtype, relation)


def _bounded_float(p: Param) -> st.SearchStrategy[float]:
    """Values a recipe would use: closed bounds and the default often, otherwise normal floats
    at least 1e-6 from an open bound (test_contract tests the extreme values separately)."""
    lo = -2.0 if p.low is None else p.low + (1e-6 if p.low_open else 0.0)
    hi = 2.0 if p.high is None else p.high - (1e-6 if p.high_open else 0.0)
    bounds = ((p.low, p.low_open), (p.high, p.high_open))
    closed = [v for v, is_open in bounds if v is not None and not is_open]
    inside = st.floats(lo, hi, allow_subnormal=False)
    return st.sampled_from([p.default, *closed]) | inside


def param_value(p: Param) -> st.SearchStrategy[Any]:
    """One valid value of a parameter, from its declared kind, choices and bounds."""
    if p.kind is bool:
        return st.booleans()
    if p.choices:
        return st.sampled_from(p.choices)
    if p.kind is int:
        lo = 0 if p.low is None else int(p.low)
        hi = min(2**32, 2**32 if p.high is None else int(p.high))
        return st.integers(lo, hi)
    return _bounded_float(p)


@st.composite
def params(draw, spec: MethodSpec, n_models: int, overrides: st.SearchStrategy) -> dict:
    """Parameters for one call: those drawn by `overrides` win over the registry's bounds."""
    out: dict[str, Any] = dict(draw(overrides))
    for p in spec.params:
        if p.name in out:
            continue
        if p.per_model and draw(st.booleans()):
            out[p.name] = [draw(param_value(p)) for _ in range(n_models)]
        else:
            out[p.name] = draw(param_value(p))
    return out
