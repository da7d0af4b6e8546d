"""Every method on every backend: shape, dtype, library and device preserved; inputs never
modified; NaN or inf in an input raises InvalidInput or shows in the result, never hidden."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.cases import CASES
from conformance.profiles import PROFILE
from conformance.run import calls, merge_on_host, reject_if_allowed
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
    after = [backend.host(a) for a in models + ([base] if base is not None else [])]
    for i, (b, a) in enumerate(zip(before, after)):
        assert_identical(a, b, f"input {i} was modified")


@pytest.mark.parametrize("name", NAMES)
@PROFILE
@given(data=st.data())
def test_nan_or_inf_input_is_an_error_or_visible(backend, name, data):
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
    try:
        out = merge_on_host(backend, call)
    except InvalidInput as exc:
        assert "nan" in str(exc).lower() or "inf" in str(exc).lower(), str(exc)
        return
    assert not np.isfinite(out.astype(np.float64)).all(), (
        f"{name}: a {bad} in input {which} vanished from the result"
    )
