"""Every registered method is covered: a case in cases.py and test vectors in spec/vectors/."""

from __future__ import annotations

import numpy as np
import pytest

from conformance.cases import CASES
from conformance.run import Call, _float32_subnormals
from conformance.strategies import Inputs
from conformance.tolerance import assert_as_specified
from conformance.vectors import VECTOR_DIR, load
from mmerge.methods import all_methods, get

METHODS = sorted(spec.name for spec in all_methods())


def test_every_registered_method_has_a_case():
    missing = sorted(set(METHODS) - set(CASES))
    assert not missing, f"add a Case for {missing} to conformance/cases.py"


def test_every_case_names_a_registered_method():
    stale = sorted(set(CASES) - set(METHODS))
    assert not stale, f"conformance/cases.py has cases for unknown methods {stale}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_layouts_are_accepted_by_the_registry(name):
    spec = get(name)
    for n, with_base in CASES[name].counts:
        spec.check_count(n, with_base)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_spec_vectors(name):
    path = VECTOR_DIR / f"{name}.json"
    assert path.exists(), f"no {path}; run `python conformance/make_vectors.py`"
    assert load(name)["cases"], f"{path} has no cases"


def test_a_backend_that_flushes_subnormals_is_spared_only_float32_subnormals():
    """CuPy's kernels flush float32 subnormals to zero: calls with one (an input entry or a float
    parameter) are not drawn for it; float16's and normal values are."""

    def call(x, **params):
        return Call("linear", Inputs([np.asarray(x)], None, str(np.asarray(x).dtype)), params)

    assert _float32_subnormals(call(np.float32([0.5, -3e-40])))
    assert _float32_subnormals(call(np.float32([0.5]), weight=[1.5e-42]))
    assert _float32_subnormals(call(np.float16([0.5]), **{"lambda": -1e-41}))
    assert not _float32_subnormals(call(np.float32([0.5, 0.0, -1.2e-38]), weight=[0.0]))
    assert not _float32_subnormals(call(np.float16([6e-8])))
    assert not _float32_subnormals(call(np.float64([1e-310])))


def test_among_subnormals_the_tolerance_is_absolute():
    """Below float32's smallest normal number every operation rounds to a multiple of the
    smallest subnormal: one such unit is within the tolerance, losing the value is not."""
    want = np.array([1e-40], np.float32)
    one_unit = np.nextafter(want, np.float32(0))
    assert_as_specified(one_unit, want, "float32", 1e-40, 1e-5, "one unit")
    with pytest.raises(AssertionError, match="lost"):
        assert_as_specified(np.zeros(1, np.float32), want, "float32", 1e-40, 2e-4, "lost")
