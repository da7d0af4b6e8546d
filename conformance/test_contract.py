"""Every method on every backend: shape, dtype, library and device preserved; no NaN from
finite inputs (an overflow may give inf, as IEEE 754 does); inputs never modified; NaN or inf
in any input raises InvalidInput naming it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.cases import CASES
from conformance.profiles import PROFILE
from conformance.run import Call, calls, merge_on_host, reject_if_allowed
from conformance.strategies import Inputs
from conformance.tolerance import assert_identical
from mmerge import backend as mm_backend
from mmerge.errors import InvalidInput
from mmerge.methods import get

NAMES = sorted(CASES)


@pytest.mark.parametrize("name", NAMES)
@PROFILE
@given(data=st.data())
def test_result_keeps_shape_dtype_library_device_and_inputs(backend, name, data):
    call = data.draw(calls(name, backend.float_dtypes()))
    models = [backend.put(m) for m in call.inputs.models]
    base = None if call.inputs.base is None else backend.put(call.inputs.base)
    before = [backend.host(a).copy() for a in models + ([base] if base is not None else [])]
    try:
        out = get(name)(models, base=base, tensor_name="t", **call.params)
    except InvalidInput as exc:
        reject_if_allowed(name, exc)
        raise
    assert mm_backend.library_name(out) == mm_backend.library_name(models[0])
    assert str(mm_backend.device_of(out)) == str(mm_backend.device_of(models[0]))
    assert out.dtype == models[0].dtype
    assert tuple(out.shape) == tuple(models[0].shape)
    assert not np.isnan(backend.host(out).astype(np.float64)).any(), "NaN from finite inputs"
    after = [backend.host(a) for a in models + ([base] if base is not None else [])]
    for i, (b, a) in enumerate(zip(before, after)):
        assert_identical(a, b, f"input {i} was modified")


@pytest.mark.parametrize("name", NAMES)
@PROFILE
@given(data=st.data())
def test_nan_or_inf_input_is_an_error(backend, name, data):
    call = data.draw(calls(name, backend.float_dtypes(), shapes=[(1,), (5,), (2, 3), (64,)]))
    everything = call.inputs.everything
    which = data.draw(st.integers(0, len(everything) - 1), label="poisoned input")
    where = data.draw(st.integers(0, everything[which].size - 1), label="flat index")
    bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value")
    poisoned = everything[which].copy()
    poisoned.reshape(-1)[where] = bad
    if which < len(call.inputs.models):
        call.inputs.models[which] = poisoned
    else:
        call.inputs.base = poisoned
    with pytest.raises(InvalidInput, match="NaN or inf"):
        merge_on_host(backend, call)


def _extremes(p) -> list:
    """The smallest and largest valid values of a bounded float or int parameter."""
    out = []
    for bound, is_open, toward in ((p.low, p.low_open, math.inf), (p.high, p.high_open, -math.inf)):
        if bound is not None:
            out.append(math.nextafter(bound, toward) if is_open else p.kind(bound))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_extreme_parameters_give_no_nan(backend, name):
    """Each bounded numeric parameter alone at its smallest and largest valid value."""
    spec, case = get(name), CASES[name]
    n, with_base = case.counts[-1]
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(64).astype(np.float32) for _ in range(n + 1)]
    inputs = Inputs(vectors[:n], vectors[n] if with_base else None, "float32")
    rescales = [{"rescale": r} for r in ("l1", "inverse_density", "none")]
    variants = rescales if any(p.name == "rescale" for p in spec.params) else [{}]
    for p in spec.params:
        if p.kind not in (int, float) or p.name in case.coupled:
            continue
        for value in _extremes(p):
            for extra in variants:
                params = {p.name: value, **extra}
                out = merge_on_host(backend, Call(name, inputs, params))
                assert not np.isnan(out.astype(np.float64)).any(), f"{name} {params}: NaN"


STANDARD_NAMES = [
    "abs",
    "acos",
    "all",
    "any",
    "arange",
    "argmax",
    "argsort",
    "asarray",
    "astype",
    "bool",
    "clip",
    "concat",
    "cos",
    "count_nonzero",
    "cumulative_sum",
    "exp",
    "float32",
    "floor",
    "int64",
    "isfinite",
    "isnan",
    "max",
    "maximum",
    "min",
    "minimum",
    "permute_dims",
    "reshape",
    "sign",
    "sin",
    "sort",
    "sqrt",
    "stack",
    "sum",
    "vecdot",
    "where",
    "zeros",
]


def test_namespace_has_the_standard_names_methods_use(xp):
    missing = [n for n in STANDARD_NAMES if not hasattr(xp, n)]
    assert not missing, f"the namespace lacks {missing}"
    assert hasattr(xp.linalg, "vector_norm")
    assert xp.isdtype(xp.float32, "real floating")
