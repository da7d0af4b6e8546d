"""Identities of spec/methods.md: linear (1, 0) is the first model; slerp t=0/1 are the
endpoints; task arithmetic with zero weights is the base; merging copies of one model returns
it; one fine-tune under TIES with density 1 is task arithmetic; every sparse method at density 1
is its unsparsified combination; all-zero task vectors give the base."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.cases import CASES
from conformance.profiles import PROFILE
from conformance.run import Call, calls, merge_on_host
from conformance.strategies import inputs
from conformance.tolerance import assert_as_specified, assert_equal_values
from mmerge.methods import get


@PROFILE
@given(data=st.data())
def test_linear_with_weights_one_zero_is_the_first_model(backend, data):
    got = data.draw(inputs(backend.float_dtypes(), 2, False))
    call = Call("linear", got, {"weight": [1.0, 0.0], "normalize": data.draw(st.booleans())})
    assert_equal_values(merge_on_host(backend, call), got.models[0], "linear (1, 0)")


@pytest.mark.parametrize("t", [0.0, 1.0])
@PROFILE
@given(data=st.data())
def test_slerp_endpoints(backend, t, data):
    call = data.draw(calls("slerp", backend.float_dtypes(), fixed={"t": t}))
    inp = call.inputs
    start, end = (inp.models[0], inp.models[1]) if inp.base is None else (inp.base, inp.models[0])
    want = start if t == 0.0 else end
    assert_as_specified(
        merge_on_host(backend, call), want, inp.dtype, inp.scale, 1e-6, f"slerp t={t}"
    )


@PROFILE
@given(data=st.data())
def test_task_arithmetic_with_zero_weights_is_the_base(backend, data):
    call = data.draw(calls("task_arithmetic", backend.float_dtypes(), fixed={"weight": 0.0}))
    assert_equal_values(merge_on_host(backend, call), call.inputs.base, "weights 0")


SELF_MERGING = sorted(n for n, c in CASES.items() if c.self_merge is not None)


@pytest.mark.parametrize("name", SELF_MERGING)
@PROFILE
@given(data=st.data())
def test_merging_copies_of_a_model_returns_it(backend, name, data):
    case = CASES[name]
    call = data.draw(
        calls(name, backend.float_dtypes(), relations=("identical",), fixed=case.self_merge)
    )
    inp = call.inputs
    if case.base_is_a_model and inp.base is not None:
        inp.base = inp.models[0]
    assert_as_specified(
        merge_on_host(backend, call), inp.models[0], inp.dtype, inp.scale, case.rtol32, name
    )


@PROFILE
@given(data=st.data())
def test_ties_of_one_model_at_density_one_is_task_arithmetic(backend, data):
    weight = data.draw(st.sampled_from([1.0, 0.5, 2.0, -1.0]), label="weight")
    lam = data.draw(st.sampled_from([1.0, 0.3]), label="lambda")
    got = data.draw(inputs(backend.float_dtypes(), 1, True))
    plain = {"weight": weight, "lambda": lam, "normalize": False}
    ties = merge_on_host(backend, Call("ties", got, {**plain, "density": 1.0}))
    task = merge_on_host(backend, Call("task_arithmetic", got, plain))
    assert_equal_values(ties, task, "ties(normalize=false) vs task_arithmetic")
    if weight > 0:  # normalized, TIES divides the weight back out
        ties = merge_on_host(backend, Call("ties", got, {"lambda": lam, "density": 1.0}))
        task = merge_on_host(backend, Call("task_arithmetic", got, {"lambda": lam}))
        assert_equal_values(ties, task, "ties(normalize=true) vs task_arithmetic, weight 1")


WITH_TASK_VECTORS = sorted(n for n in CASES if get(n).needs_base)


@pytest.mark.parametrize("name", WITH_TASK_VECTORS)
@PROFILE
@given(data=st.data())
def test_zero_task_vectors_give_the_base(backend, name, data):
    call = data.draw(calls(name, backend.float_dtypes()))
    inp = call.inputs
    inp.models = [inp.base.copy() for _ in inp.models]
    assert_equal_values(merge_on_host(backend, call), inp.base, f"{name}, all models = base")


UNSPARSIFIED = {
    "ties": "ties",
    "dare_ties": "ties",
    "breadcrumbs_ties": "ties",
    "della": "ties",
    "dare_linear": "task_arithmetic",
    "breadcrumbs": "task_arithmetic",
    "della_linear": "task_arithmetic",
}


@pytest.mark.parametrize("name", sorted(UNSPARSIFIED))
@PROFILE
@given(data=st.data())
def test_density_one_is_the_unsparsified_combination(backend, name, data):
    call = data.draw(calls(name, backend.float_dtypes(), fixed={"density": 1.0}))
    plain = UNSPARSIFIED[name]
    shared = {p.name for p in get(plain).params} - {"density", "rescale"}
    params = {k: v for k, v in call.params.items() if k in shared}
    params.setdefault("normalize", get(name).param("normalize").default)
    want = merge_on_host(backend, Call(plain, call.inputs, params))
    assert_equal_values(merge_on_host(backend, call), want, f"{name} at density 1 vs {plain}")
