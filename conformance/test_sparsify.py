"""Trimming and sign election (spec/methods.md): a TIES trim keeps exactly the top
max(1, int(density*n)) magnitudes with ties to the lower flat index, breadcrumbs keeps the
band after the gamma outliers, and every TIES-merged entry has the elected sign."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import reference
from conformance.cases import positive_weights
from conformance.profiles import PROFILE
from conformance.run import Call, merge_on_host
from conformance.strategies import Inputs, as_f64, inputs
from conformance.tolerance import assert_equal_values

DENSITY = st.sampled_from([0.1, 0.5, 0.9, 1.0]) | st.floats(0.001, 1.0)


def one_model_over_zero_base(dtypes, data) -> Inputs:
    got = data.draw(inputs(dtypes, 1, False))
    return Inputs(got.models, np.zeros_like(got.models[0]), got.dtype)


@PROFILE
@given(data=st.data())
def test_ties_trim_keeps_exactly_the_top_k_with_index_tie_break(backend, data):
    inp = one_model_over_zero_base(backend.float_dtypes(), data)
    density = data.draw(DENSITY, label="density")
    x = inp.models[0]
    want = np.where(reference.top_k_mask(x, reference.ties_count(density, x.size)), x, 0)
    call = Call("ties", inp, {"density": density, "rescale": "none"})
    assert_equal_values(merge_on_host(backend, call), want.astype(x.dtype), "ties trim")


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@PROFILE
@given(data=st.data())
def test_breadcrumbs_keeps_the_band_below_the_outliers(backend, name, data):
    inp = one_model_over_zero_base(backend.float_dtypes(), data)
    density = data.draw(DENSITY, label="density")
    gamma = data.draw(st.sampled_from([0.0, 0.01, 0.1]) | st.floats(0.0, 0.5), label="gamma")
    x = inp.models[0]
    want = np.where(reference.band_mask(x, density, gamma), x, 0)
    call = Call(name, inp, {"density": density, "gamma": gamma, "rescale": "none"})
    assert_equal_values(merge_on_host(backend, call), want.astype(x.dtype), name)


@pytest.mark.parametrize("election", ["weighted_sum", "sum", "count"])
@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
@PROFILE
@given(data=st.data())
def test_merged_entries_have_the_elected_sign(backend, name, election, data):
    n = data.draw(st.integers(2, 4), label="models")
    got = data.draw(inputs(backend.float_dtypes(), n, False))
    inp = Inputs(got.models, np.zeros_like(got.models[0]), got.dtype)
    weight = data.draw(positive_weights(n), label="weight")
    weights = weight if isinstance(weight, list) else [weight] * n
    density = data.draw(DENSITY, label="density")
    params = {"weight": weight, "density": density, "election": election, "rescale": "none"}
    if name == "breadcrumbs_ties":
        params["gamma"] = 0.0
    trimmed = [
        np.where(reference.top_k_mask(x, reference.ties_count(density, x.size)), as_f64(x), 0)
        if name == "ties"
        else np.where(reference.band_mask(x, density, 0.0), as_f64(x), 0)
        for x in inp.models
    ]
    votes = trimmed if election == "sum" else [w * t for w, t in zip(weights, trimmed)]
    positive = reference.elected_positive(votes, election)
    total = np.abs(sum(votes))
    clear = (total > 1e-4 * inp.scale) | (election == "count")  # no rounding-close elections
    r = as_f64(merge_on_host(backend, Call(name, inp, params)))
    wrong = clear & (r != 0) & ((r > 0) != positive)
    assert not wrong.any(), f"{int(wrong.sum())} merged entries against the elected sign"
