"""Backend agreement (spec/methods.md): each method on each backend against the numpy result
on the same inputs; bit-identical for methods made of elementwise float arithmetic and integer
masks (Case.exact), within the case's tolerance otherwise; and the same refusals."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from conformance.backends import REFERENCE
from conformance.cases import CASES
from conformance.profiles import PROFILE
from conformance.run import calls, merge_on_host, reject_if_allowed
from conformance.tolerance import assert_as_specified, assert_identical
from mmerge.errors import InvalidInput


@pytest.mark.parametrize("name", sorted(CASES))
@PROFILE
@given(data=st.data())
def test_backend_matches_the_reference_backend(backend, name, data):
    call = data.draw(calls(name, backend.float_dtypes()))
    assume(CASES[name].well_posed(call.inputs, call.params))
    try:
        want = merge_on_host(REFERENCE, call)
    except InvalidInput as exc:
        reject_if_allowed(name, exc)
        with pytest.raises(InvalidInput):
            merge_on_host(backend, call)
        return
    got = merge_on_host(backend, call)
    case, inp = CASES[name], call.inputs
    if case.exact:
        assert_identical(got, want, f"{name} on {backend.id}")
    else:
        assert_as_specified(got, want, inp.dtype, inp.scale, case.rtol32, f"{name} on {backend.id}")
