"""Symmetries of spec/methods.md: model order does not matter for symmetric methods (the
per-model parameters move with their models), and slerp(a, b, t) = slerp(b, a, 1 - t)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from conformance.cases import CASES
from conformance.profiles import PROFILE
from conformance.run import Call, calls, merge_on_host
from conformance.strategies import Inputs
from conformance.tolerance import assert_as_specified
from mmerge.methods import get

SYMMETRIC = sorted(n for n, c in CASES.items() if c.symmetric)


@pytest.mark.parametrize("name", SYMMETRIC)
@PROFILE
@given(data=st.data())
def test_model_order_does_not_matter(backend, name, data):
    call = data.draw(calls(name, backend.float_dtypes()))
    n = len(call.inputs.models)
    assume(n > 1 and CASES[name].well_posed(call.inputs, call.params))
    order = data.draw(st.permutations(range(n)), label="order")
    per_model = {p.name for p in get(name).params if p.per_model}
    params = {
        k: [v[i] for i in order] if k in per_model and isinstance(v, list) else v
        for k, v in call.params.items()
    }
    inp = call.inputs
    shuffled = Inputs([inp.models[i] for i in order], inp.base, inp.dtype, inp.relation)
    want = merge_on_host(backend, call)
    got = merge_on_host(backend, Call(name, shuffled, params))
    assert_as_specified(
        got, want, inp.dtype, inp.scale, CASES[name].rtol32, f"{name} order {order}"
    )


@PROFILE
@given(data=st.data())
def test_slerp_reversed_is_slerp_at_one_minus_t(backend, data):
    call = data.draw(calls("slerp", backend.float_dtypes()))
    inp = call.inputs
    a, b = (inp.models[0], inp.models[1]) if inp.base is None else (inp.base, inp.models[0])
    swapped = Inputs([b, a], None, inp.dtype, inp.relation)
    back = {**call.params, "t": 1.0 - call.params["t"]}
    want = merge_on_host(backend, Call("slerp", Inputs([a, b], None, inp.dtype), call.params))
    got = merge_on_host(backend, Call("slerp", swapped, back))
    assert_as_specified(got, want, inp.dtype, inp.scale, CASES["slerp"].rtol32, "slerp reversed")
